"""Tabular features for the gradient-boosted trees: parsed fields, derived quantities, name
tokens, keyword flags, categorical codes, and PCA-compressed text and image embeddings.

Why a feature set of its own: trees are good at the sharp interactions between quantity, unit and
pack count that the fusion network smooths over, but they cannot use a 384-d embedding well on a
few tens of thousands of rows. PCA keeps most of the embedding signal at a size trees handle; the
explicit parsed fields carry the rest.

Everything fitted here (category vocabularies, PCA bases) is fitted on the training rows of a
fold only (see features.fold_features) and is deterministic given the seed, so a held-out row,
a test row and a served row are featurized the same way. It saves as JSON + .npy, without pickle:
a model directory is data, not code to execute on load.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

from pricefuse.core import compat
from pricefuse.core.layout import FOLD, LOG_PRICE, NAME_AS_WRITTEN
from pricefuse.features.product_terms import product_terms
from pricefuse.features.target_encoding import Encoding, out_of_group

# scikit-learn loads libgomp, which reads OMP_WAIT_POLICY once and shares itself with the
# boosters loaded later; so the default is set before sklearn is first imported (lazily, below).
compat.apply_env_defaults()

# Columns taken as they are when the table has them: neighbour-price features
# (pricefuse.models.neighbours.predictor) and stacked member predictions (`member_<name>`, log1p).
EXTRA_PREFIXES = ("nbr_", "member_")
# Parsed columns used as they are (numbers and 0/1 flags).
NUMERIC_COLUMNS = (
    "value",
    "quantity",
    "log_quantity",
    "pack",
    "n_bullets",
    "text_len",
    "value_missing",
    "unit_missing",
)
# Parsed string columns encoded as integer codes over a vocabulary fitted on train.
CATEGORICAL_COLUMNS = ("unit", "quantity_kind")
REQUIRED_COLUMNS = ("item_name", *NUMERIC_COLUMNS, *CATEGORICAL_COLUMNS)
# Hand features from the item name (pricefuse.features.product_terms): the product type as a
# categorical code, and the target encodings of the brand, the first two words and the type
# (pricefuse.features.target_encoding), each fitted on the fold's fit rows only.
TYPE_CODE = "product_type"
ENCODED_KEYS = ("brand", "brand_pair", "product_type")
HAND_COLUMNS = (
    TYPE_CODE,
    "brand_te",
    "brand_count",
    "brand_pair_te",
    "brand_pair_count",
    "product_type_te",
)

# Words in the item name that move prices: quality tiers, multi-item offers, bulk and refills.
KEYWORDS: dict[str, str] = {
    "organic": r"\borganic\b",
    "premium": r"\b(?:premium|gourmet|luxury|artisan)\b",
    "pack": r"\b(?:packs?|pk|multipack)\b",
    "set": r"\bsets?\b",
    "kit": r"\bkits?\b",
    "bundle": r"\b(?:bundles?|variety|assorted|assortment)\b",
    "bulk": r"\b(?:bulk|case|wholesale|value size|family size)\b",
    "gift": r"\bgifts?\b",
    "refill": r"\brefills?\b",
    "sample": r"\b(?:samples?|trial|travel size|mini)\b",
    "sugar_free": r"\b(?:sugar|gluten)[- ]free\b",
}
_KEYWORD_PATTERNS = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in KEYWORDS.items()}
# "1,000", "12", "1.5": thousands separators are dropped before parsing.
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
FEATURIZER_FILE = "featurizer.json"


@dataclass(frozen=True)
class Embeddings:
    """Per-row embedding arrays aligned with a parsed table (row i belongs to row i).

    `image_mask[i]` is False where the row has no usable image; its `image` row is meaningless.
    `llm`: the opt-in LLM text block (pricefuse.features.llm), None when `embed.llm` is off.
    """

    text: np.ndarray
    image: np.ndarray
    image_mask: np.ndarray
    llm: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.text)
        llm_rows = n if self.llm is None else len(self.llm)
        if len(self.image) != n or len(self.image_mask) != n or llm_rows != n:
            raise ValueError(
                f"embedding rows differ: text {len(self.text)}, image {len(self.image)}, "
                f"image_mask {len(self.image_mask)}"
                + ("" if self.llm is None else f", llm {len(self.llm)}")
            )

    def __len__(self) -> int:
        return len(self.text)

    def take(self, rows: np.ndarray) -> Embeddings:
        """The embeddings of a subset of rows (an index or boolean mask)."""
        return Embeddings(
            self.text[rows],
            self.image[rows],
            np.asarray(self.image_mask)[rows],
            None if self.llm is None else self.llm[rows],
        )


@dataclass(frozen=True)
class FeatureMatrix:
    """Rows x features as float32 with NaN for missing, plus what the boosters need to know.

    Columns listed in `categorical` hold non-negative integer codes (NaN = unknown category), so
    each booster can declare them as categorical in its own way.
    """

    values: np.ndarray
    names: tuple[str, ...]
    categorical: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[1] != len(self.names):
            raise ValueError(f"values {self.values.shape} do not match {len(self.names)} names")

    def __len__(self) -> int:
        return len(self.values)

    def take(self, rows: np.ndarray) -> FeatureMatrix:
        """The same features for a subset of rows (an index or boolean mask)."""
        return FeatureMatrix(self.values[rows], self.names, self.categorical)

    def frame(self) -> pd.DataFrame:
        """As a DataFrame (for inspection and for boosters that prefer named columns)."""
        return pd.DataFrame(self.values, columns=list(self.names))


@dataclass(frozen=True)
class Projection:
    """A fitted PCA as the two arrays its transform uses: rows -> (rows - mean) @ components.T.

    Why not keep sklearn's PCA object: these arrays are all a transform needs, they save as .npy
    without pickle, and the in-memory and the reloaded featurizer then run the same arithmetic.
    """

    mean: np.ndarray  # (n_features,)
    components: np.ndarray  # (n_components, n_features)

    @property
    def width(self) -> int:
        return int(self.components.shape[0])

    def transform(self, rows: np.ndarray) -> np.ndarray:
        return (np.asarray(rows, dtype=np.float64) - self.mean) @ self.components.T


def _fit_pca(rows: np.ndarray, n_components: int, seed: int) -> Projection | None:
    """PCA with as many components as the data allows; None when it allows none."""
    from sklearn.decomposition import PCA

    k = min(n_components, rows.shape[0], rows.shape[1]) if rows.ndim == 2 else 0
    if k < 1 or rows.shape[0] < 2:
        return None
    pca = PCA(n_components=k, random_state=seed).fit(rows.astype(np.float64))
    return Projection(np.asarray(pca.mean_, np.float64), np.asarray(pca.components_, np.float64))


def _pca_width(pca: Projection | None) -> int:
    return 0 if pca is None else pca.width


class EmbeddingCompressor:
    """PCA of the text and image embeddings (and of the LLM block, when the rows it is fitted on
    carry one: `llm_pc*`) down to a few components each.

    Why the image PCA sees only rows with an image: rows without one carry a zero placeholder
    vector that would dominate the first component; their image components are NaN instead, which
    every booster treats as "missing" and routes on its own.
    """

    def __init__(
        self, text_components: int, image_components: int, seed: int, llm_components: int = 0
    ) -> None:
        self.text_components = text_components
        self.image_components = image_components
        self.llm_components = llm_components
        self.seed = seed
        self.text_pca: Projection | None = None
        self.image_pca: Projection | None = None
        self.llm_pca: Projection | None = None

    def fit(self, emb: Embeddings) -> Self:
        mask = np.asarray(emb.image_mask, dtype=bool)
        self.text_pca = _fit_pca(np.asarray(emb.text), self.text_components, self.seed)
        self.image_pca = _fit_pca(np.asarray(emb.image)[mask], self.image_components, self.seed)
        self.llm_pca = None
        if emb.llm is not None and self.llm_components > 0:
            self.llm_pca = _fit_pca(np.asarray(emb.llm), self.llm_components, self.seed)
        return self

    @property
    def names(self) -> tuple[str, ...]:
        text = tuple(f"text_pc{i}" for i in range(_pca_width(self.text_pca)))
        image = tuple(f"image_pc{i}" for i in range(_pca_width(self.image_pca)))
        llm = tuple(f"llm_pc{i}" for i in range(_pca_width(self.llm_pca)))
        return text + image + llm

    def transform(self, emb: Embeddings) -> np.ndarray:
        n = len(emb)
        parts = [np.empty((n, 0), dtype=np.float32)]
        if self.text_pca is not None:
            parts.append(self.text_pca.transform(emb.text))
        if self.image_pca is not None:
            mask = np.asarray(emb.image_mask, dtype=bool)
            image = np.full((n, _pca_width(self.image_pca)), np.nan)
            if mask.any():
                image[mask] = self.image_pca.transform(np.asarray(emb.image)[mask])
            parts.append(image)
        if self.llm_pca is not None:
            if emb.llm is None:
                raise ValueError(
                    "this featurizer was fitted with the LLM block (llm_pc* features) but the "
                    "rows have none: compute it as embed does (embed.llm in the params)"
                )
            parts.append(self.llm_pca.transform(emb.llm))
        return np.hstack(parts).astype(np.float32)


def _name_numbers(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(largest number, how many numbers) in each item name: sizes and counts hide there.

    A digit run too long for a float (400 digits read as inf) counts as a number but not as the
    largest one: an infinite feature would stop XGBoost and poison the others.
    """
    largest = np.full(len(names), np.nan)
    counts = np.zeros(len(names))
    for i, name in enumerate(names):
        numbers = [float(tok.replace(",", "")) for tok in _NUMBER.findall(name)]
        counts[i] = len(numbers)
        finite = [number for number in numbers if np.isfinite(number)]
        if finite:
            largest[i] = max(finite)
    return largest, counts


def _safe_log1p(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.clip(x, 0.0, None))


def parsed_features(parsed: pd.DataFrame) -> pd.DataFrame:
    """Numeric features from the parsed table alone (no fitted state), one column per feature.

    Why both per-pack and total quantity: the catalog's Value is sometimes the pack total and
    sometimes per item, so the trees get both readings and pick by context.
    """
    return pd.DataFrame(_parsed_columns(parsed), index=parsed.index)


def _parsed_columns(parsed: pd.DataFrame) -> dict[str, np.ndarray]:
    """`parsed_features`' columns as float64 arrays, in its column order (what
    `TabularFeaturizer.transform` stacks, without framing them first)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in parsed.columns]
    if missing:
        raise ValueError(f"parsed table lacks column(s) {', '.join(missing)}")
    # Columns gathered as arrays and framed once: a column insert per feature cost more than
    # the features themselves on the served model's single rows.
    out = {c: _numeric(parsed[c]) for c in NUMERIC_COLUMNS}
    pack = np.clip(out["pack"], 1.0, None)  # NaN stays NaN, as pandas' clip
    out["log_value"] = _safe_log1p(out["value"])
    out["log_quantity_per_pack"] = _safe_log1p(out["quantity"] / pack)
    out["log_quantity_times_pack"] = _safe_log1p(out["quantity"] * pack)
    # The name as written: the preprocess text options (numbers as words) must not erase the
    # digits these features count.
    name_column = NAME_AS_WRITTEN if NAME_AS_WRITTEN in parsed.columns else "item_name"
    # `fillna("").astype(str)` per value: pandas' string casts cost more on a served row
    names = ["" if v is None or v is pd.NA or v != v else str(v) for v in parsed[name_column]]
    largest, counts = _name_numbers(names)
    out["name_log_max_number"] = _safe_log1p(largest)
    out["name_n_numbers"] = counts
    out["name_len"] = np.array([float(len(name)) for name in names])
    out["name_words"] = np.array([float(len(name.split())) for name in names])
    for key, pattern in _KEYWORD_PATTERNS.items():
        out[f"kw_{key}"] = np.array([float(bool(pattern.search(name))) for name in names])
    return out


# Not column names: TabularFeaturizer.transform's cache keys (the parsed features; the values of
# a categorical column, by name after the prefix).
_PARSED_KEY = "<parsed_features>"
_VALUES_KEY = "<values>"


def _numeric(column: pd.Series) -> np.ndarray:
    """The column as float64, NaN where missing or not a number (`pd.to_numeric(errors=
    "coerce")`); a column that already holds numbers skips `to_numeric`, which cost more than
    the features themselves on a served row."""
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "biuf":
        return column.to_numpy().astype(np.float64)  # NumPy numbers: NaN is their only missing
    if not pd.api.types.is_numeric_dtype(column.dtype):
        column = pd.to_numeric(column, errors="coerce")
    return column.to_numpy(dtype=np.float64, na_value=np.nan)


@functools.lru_cache(maxsize=64)
def _code_lookup(vocabulary: tuple[str, ...]) -> dict[str, float]:
    """Category -> code for one fitted vocabulary: built once, not per call (the featurizers of
    all folds are asked for every served row)."""
    return {v: float(i) for i, v in enumerate(vocabulary)}


def _categorical_codes(values: pd.Series | list[Any], vocabulary: tuple[str, ...]) -> np.ndarray:
    """Index of each value in the vocabulary; NaN for values never seen in train (or missing)."""
    lookup = _code_lookup(vocabulary)
    items = values.tolist() if isinstance(values, pd.Series) else values
    return np.array([lookup.get(v, np.nan) for v in items], dtype=np.float64)


class TabularFeaturizer:
    """Parsed table + embeddings -> FeatureMatrix, with every fitted part fitted on train.

    The column layout is fixed at fit time: parsed features, then categorical codes, then
    `has_image` (from the embedding mask, which is what the image features actually reflect),
    then the `nbr_*` / `member_*` columns the table had at fit time (neighbour features, stacked
    member predictions; NaN when a later table lacks one), then PCA components. An unknown unit
    at predict time becomes a missing category code rather than an error, so the served model
    degrades gracefully on new spellings.
    """

    def __init__(
        self, text_components: int, image_components: int, seed: int, llm_components: int = 0
    ) -> None:
        self.compressor = EmbeddingCompressor(
            text_components, image_components, seed, llm_components
        )
        self.vocabulary: dict[str, tuple[str, ...]] = {}
        self.names: tuple[str, ...] = ()
        self.extra_columns: tuple[str, ...] = ()
        # Hand features' fitted state (None: a featurizer saved before them, which has none).
        self.encodings: dict[str, Encoding] | None = None

    @property
    def categorical(self) -> tuple[int, ...]:
        return tuple(
            self.names.index(c) for c in (*CATEGORICAL_COLUMNS, TYPE_CODE) if c in self.names
        )

    def fit(self, parsed: pd.DataFrame, emb: Embeddings) -> Self:
        _check_rows(parsed, emb)
        self.vocabulary = {
            c: tuple(sorted(parsed[c].dropna().astype(str).unique())) for c in CATEGORICAL_COLUMNS
        }
        self.compressor.fit(emb)
        terms = _terms(parsed, {})
        self.vocabulary[TYPE_CODE] = tuple(sorted(set(terms[TYPE_CODE])))
        y = _targets(parsed)
        self.encodings = {key: Encoding.fit(terms[key], y) for key in ENCODED_KEYS}
        base = tuple(parsed_features(parsed.iloc[:0]).columns)
        self.extra_columns = tuple(c for c in parsed.columns if c.startswith(EXTRA_PREFIXES))
        self.names = (
            *base,
            *CATEGORICAL_COLUMNS,
            "has_image",
            *HAND_COLUMNS,
            *self.extra_columns,
            *self.compressor.names,
        )
        return self

    def transform(
        self, parsed: pd.DataFrame, emb: Embeddings, shared: dict[str, Any] | None = None
    ) -> FeatureMatrix:
        """`shared`: a dict kept by a caller that transforms the same rows with several
        featurizers (one per fold); the columns without fitted state (parsed features, the
        `nbr_*`/`member_*` columns, the categorical values before coding) are computed once
        into it and reused. A caller may put `nbr_*`/`member_*` columns it already holds as
        float64 arrays there first."""
        if not self.names:
            raise RuntimeError("TabularFeaturizer.transform called before fit")
        _check_rows(parsed, emb)
        shared = {} if shared is None else shared
        if _PARSED_KEY not in shared:
            columns = list(_parsed_columns(parsed).values())
            shared[_PARSED_KEY] = np.column_stack(columns).astype(np.float64, copy=False)
        for c in CATEGORICAL_COLUMNS:
            if _VALUES_KEY + c not in shared:
                shared[_VALUES_KEY + c] = parsed[c].tolist()
        base = shared[_PARSED_KEY]
        codes = [
            _categorical_codes(shared[_VALUES_KEY + c], self.vocabulary[c])
            for c in CATEGORICAL_COLUMNS
        ]
        has_image = np.asarray(emb.image_mask, dtype=np.float64)
        for c in self.extra_columns:
            if c not in shared:
                shared[c] = (
                    _numeric(parsed[c]) if c in parsed.columns else np.full(len(parsed), np.nan)
                )
        neighbours = [shared[c] for c in self.extra_columns]
        hand = self._hand_columns(parsed, shared)
        values = np.column_stack([base, *codes, has_image, *hand, *neighbours]).astype(np.float32)
        values = np.hstack([values, self.compressor.transform(emb)])
        return FeatureMatrix(values, self.names, self.categorical)

    def _hand_columns(self, parsed: pd.DataFrame, shared: dict[str, Any]) -> list[np.ndarray]:
        """HAND_COLUMNS' values from the encodings fitted on every fit row (held-out, test and
        served rows); none for a featurizer saved before the hand features."""
        if self.encodings is None:
            return []
        terms = _terms(parsed, shared)
        enc = self.encodings
        return [
            _categorical_codes(terms[TYPE_CODE], self.vocabulary[TYPE_CODE]),
            enc["brand"].transform(terms["brand"]),
            enc["brand"].log_counts(terms["brand"]),
            enc["brand_pair"].transform(terms["brand_pair"]),
            enc["brand_pair"].log_counts(terms["brand_pair"]),
            enc["product_type"].transform(terms[TYPE_CODE]),
        ]

    def transform_fit_rows(self, parsed: pd.DataFrame, emb: Embeddings) -> FeatureMatrix:
        """The rows this featurizer was fitted on, for the boosters to train on: as
        `transform`, but each row's target encodings come from the other group folds among
        them (pricefuse.features.target_encoding.out_of_group), never from its own price."""
        matrix = self.transform(parsed, emb)
        if self.encodings is None:
            return matrix
        terms = _terms(parsed, {})
        y = _targets(parsed)
        groups = parsed[FOLD].to_numpy() if FOLD in parsed.columns else np.zeros(len(parsed))
        values = matrix.values.copy()
        for key, te, count in (
            ("brand", "brand_te", "brand_count"),
            ("brand_pair", "brand_pair_te", "brand_pair_count"),
            ("product_type", "product_type_te", None),
        ):
            encoded, counts = out_of_group(terms[key], y, groups)
            values[:, self.names.index(te)] = encoded
            if count is not None:
                values[:, self.names.index(count)] = counts
        return FeatureMatrix(values, self.names, self.categorical)

    def save(self, directory: Path | str) -> Path:
        """`featurizer.json` (sizes, seed, vocabularies, column layout) and one .npy per PCA
        array (`<text|image|llm>_pca_<mean|components>.npy`) in `directory`; no pickle."""
        if not self.names:
            raise RuntimeError("TabularFeaturizer.save called before fit")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        compressor = self.compressor
        projections = {
            "text": compressor.text_pca,
            "image": compressor.image_pca,
            "llm": compressor.llm_pca,
        }
        for view, projection in projections.items():
            if projection is not None:
                np.save(directory / f"{view}_pca_mean.npy", projection.mean)
                np.save(directory / f"{view}_pca_components.npy", projection.components)
        state = {
            "text_components": compressor.text_components,
            "image_components": compressor.image_components,
            "llm_components": compressor.llm_components,
            "seed": compressor.seed,
            "pca": [view for view, projection in projections.items() if projection is not None],
            "vocabulary": {c: list(v) for c, v in self.vocabulary.items()},
            "encodings": None
            if self.encodings is None
            else {key: e.state() for key, e in self.encodings.items()},
            "extra_columns": list(self.extra_columns),
            "names": list(self.names),
        }
        (directory / FEATURIZER_FILE).write_text(json.dumps(state, indent=1, ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, directory: Path | str) -> TabularFeaturizer:
        """The featurizer `save` wrote; it transforms exactly as the saved one did."""
        directory = Path(directory)
        path = directory / FEATURIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a saved TabularFeaturizer")
        state: dict[str, Any] = json.loads(path.read_text())
        featurizer = cls(
            state["text_components"],
            state["image_components"],
            state["seed"],
            state.get("llm_components", 0),  # 0: saved before the LLM block existed
        )
        for view in state["pca"]:
            projection = Projection(
                np.load(directory / f"{view}_pca_mean.npy"),
                np.load(directory / f"{view}_pca_components.npy"),
            )
            setattr(featurizer.compressor, f"{view}_pca", projection)
        featurizer.vocabulary = {c: tuple(v) for c, v in state["vocabulary"].items()}
        featurizer.extra_columns = tuple(state["extra_columns"])
        featurizer.names = tuple(state["names"])
        encodings = state.get("encodings")
        if encodings is not None:
            featurizer.encodings = {k: Encoding.from_state(v) for k, v in encodings.items()}
        pcs = featurizer.compressor.names
        if pcs and featurizer.names[-len(pcs) :] != pcs:
            raise ValueError(f"{path}: feature names do not end with the saved PCA components")
        return featurizer


_TERMS_KEY = "<product_terms>"


def _terms(parsed: pd.DataFrame, shared: dict[str, Any]) -> dict[str, list[str]]:
    """Brand, first-two-words and product type of each row's name as written (computed once
    per `shared` cache: every fold's featurizer reads the same)."""
    if _TERMS_KEY not in shared:
        column = NAME_AS_WRITTEN if NAME_AS_WRITTEN in parsed.columns else "item_name"
        names = ["" if v is None or v is pd.NA or v != v else str(v) for v in parsed[column]]
        shared[_TERMS_KEY] = product_terms(names)
    return shared[_TERMS_KEY]


def _targets(parsed: pd.DataFrame) -> np.ndarray:
    """The fit rows' log1p prices for the target encodings; a table without prices (a caller
    fitting on unpriced rows) gets NaN encodings rather than an error."""
    if LOG_PRICE in parsed.columns:
        return _numeric(parsed[LOG_PRICE])
    return np.full(len(parsed), np.nan)


def _check_rows(parsed: pd.DataFrame, emb: Embeddings) -> None:
    if len(parsed) != len(emb):
        raise ValueError(
            f"parsed table has {len(parsed)} rows but the embeddings have {len(emb)}; "
            "they must be aligned row by row"
        )
