"""Neighbour-price features: what did the most similar training items sell for?

The catalogue repeats a product under other pack sizes, sellers and wordings, so the log prices of
a row's nearest training rows are strong, cheap signal on small data. For every row and every
space (TF-IDF of the name view, TF-IDF of the full text, the text embedding, the image embedding
where the row has an image) five statistics of its k nearest training rows' log prices are
computed: weighted mean, median, weighted spread, the similarity of the closest and its price.

Weights follow the nearest-neighbour correction proposed in the SPAM_LLMs write-up: a neighbour at
cosine similarity s weighs exp(-decay * (1 - s)), and with `band` > 0 neighbours whose log price
lies farther than `band` from the neighbours' median are dropped (a mispriced listing must not drag
the estimate).

No leaks: train rows see only neighbours from other folds, and every fitted part (the TF-IDF
vocabularies) is fitted on those other folds only (`oof_features`). Test and served rows see all
train rows (`NeighbourIndex.fit` on every train row). Search is exact: faiss inner-product indexes
on the normalised embeddings, brute-force cosine search on the sparse TF-IDF rows (scikit-learn's
operations, blocks of queries in `neighbours.n_jobs` worker processes; search.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pricefuse.core.config import NeighboursConfig, section_from_dict
from pricefuse.features.ngrams import (
    TfidfRows,
    fit_vectorizer,
    load_vectorizer,
    make_vectorizer,
    save_vectorizer,
    text_view,
)
from pricefuse.models.neighbours.search import (
    LLM_SPACE,
    PREFIX,
    SPACES,
    STATS,
    NeighbourRows,
    _normalise,
    dense_index,
    feature_names,
    neighbour_stats,
    search_dense,
    search_sparse,
    sparse_index,
)

MEMBER = "knn"
MANIFEST = "neighbours.json"
# `neighbours` parameters added after indexes were first saved, with the value an index saved
# before them takes: such an index still loads. n_jobs changes how fast, never what, it finds.
MANIFEST_DEFAULTS = {"n_jobs": 0}


@dataclass
class _Space:
    """One fitted search space: how to embed rows, the key matrix and the keys' values."""

    name: str
    keys: Any  # csr matrix (TF-IDF) or float32 array (embeddings), one row per key
    values: np.ndarray  # log price per key
    vectorizer: Any = None  # TF-IDF spaces only
    _index: Any = None  # the search structure, built on first use and kept
    _rows: TfidfRows | None = None  # the vectorizer's fast transform, made on first use

    def embed(self, texts: list[str]) -> Any:
        """A TF-IDF space's query rows: `vectorizer.transform(texts)`, through `TfidfRows` (the
        same matrix without scikit-learn's per-call checks, which outweighed a served row's
        tokenising)."""
        if self._rows is None:
            self._rows = TfidfRows(self.vectorizer)
        return self._rows.transform(texts)

    def search(self, queries: Any, k: int, n_jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """`search_sparse`/`search_dense` over this space's keys, with `n_jobs` workers (sparse)
        or threads (faiss). Why the kept index: a served model queries the same keys for every
        request, and rebuilding the faiss index (and re-normalising the keys) per request cost
        more than the search itself."""
        if self.vectorizer is not None:
            if self._index is None:
                self._index = sparse_index(self.keys)
            return search_sparse(queries, self.keys, k, self._index, n_jobs=n_jobs)
        if self._index is None:
            self._index = dense_index(self.keys)
        return search_dense(queries, self.keys, k, self._index, n_jobs=n_jobs)


def llm_space_error() -> str:
    return (
        f"neighbours.spaces lists {LLM_SPACE} but the rows carry no LLM text block: set "
        f"embed.llm.model (and re-run embed), or remove {LLM_SPACE} from neighbours.spaces"
    )


def _view(space: str) -> str:
    return space.removeprefix("tfidf_")


def _space_rows(space: str, rows: NeighbourRows) -> tuple[Any, np.ndarray]:
    """(row vectors, which rows take part) for a dense space: images only where present."""
    if space == "text_embedding":
        return rows.text, np.ones(len(rows), dtype=bool)
    if space == "image":
        mask = np.asarray(rows.image_mask, dtype=bool)
        return rows.image[mask], mask
    if space == LLM_SPACE:
        if rows.llm is None:
            raise ValueError(llm_space_error())
        return rows.llm, np.ones(len(rows), dtype=bool)
    raise ValueError(f"unknown neighbour space {space!r}; known: {', '.join(SPACES)}")


class NeighbourIndex:
    """Train rows as keys in every configured space: fitted once, queried for any rows."""

    def __init__(self, cfg: NeighboursConfig, spaces: dict[str, _Space]) -> None:
        self.cfg = cfg
        self.spaces = spaces

    @classmethod
    def fit(cls, cfg: NeighboursConfig, keys: NeighbourRows, values: np.ndarray) -> NeighbourIndex:
        values = np.asarray(values, dtype=np.float64)
        spaces: dict[str, _Space] = {}
        for space in cfg.spaces:
            if space.startswith("tfidf_"):
                vectorizer = make_vectorizer("word", (1, cfg.tfidf_max_ngram))
                texts = text_view(keys.parsed, _view(space))
                matrix = fit_vectorizer(vectorizer, texts)
                spaces[space] = _Space(space, matrix, values, vectorizer)
            else:
                vectors, mask = _space_rows(space, keys)
                spaces[space] = _Space(space, _normalise(vectors), values[mask])
        return cls(cfg, spaces)

    @property
    def columns(self) -> list[str]:
        return feature_names(tuple(self.spaces))

    def features(self, rows: NeighbourRows) -> pd.DataFrame:
        """One column per (space, statistic); NaN where a space has nothing for the row
        (no image, or no key with an image)."""
        return pd.DataFrame(self.feature_matrix(rows), columns=self.columns)

    def feature_matrix(self, rows: NeighbourRows) -> np.ndarray:
        """`features` as a float64 array (rows x `columns`)."""
        out = np.full((len(rows), len(self.columns)), np.nan)
        for i, (name, space) in enumerate(self.spaces.items()):
            k = min(self.cfg.k, space.values.shape[0])
            if k < 1 or len(rows) == 0:
                continue
            if space.vectorizer is not None:
                queries = space.embed(text_view(rows.parsed, _view(name)))
                sims, idx = space.search(queries, k, self.cfg.n_jobs)
                mask = np.ones(len(rows), dtype=bool)
            else:
                queries, mask = _space_rows(name, rows)
                if not mask.any():
                    continue
                sims, idx = space.search(queries, k, self.cfg.n_jobs)
            block = neighbour_stats(sims, space.values[idx], self.cfg.decay, self.cfg.band)
            out[mask, i * len(STATS) : (i + 1) * len(STATS)] = block
        return out

    def augment(self, batch: Any) -> Any:
        """The registry's feature hook: `batch` (a MemberBatch) with the neighbour columns added
        (also as its `arrays`, which the heads read them from)."""
        rows = NeighbourRows(batch.base, batch.text, batch.image, batch.image_mask, batch.llm)
        matrix = self.feature_matrix(rows)
        return batch.with_arrays({name: matrix[:, i] for i, name in enumerate(self.columns)})

    def predict_members(self, batch: Any) -> dict[str, np.ndarray]:
        """The registry's serving interface: the `knn` member, from the batch's neighbour columns
        (computed here when `augment` has not added them)."""
        columns = feature_names(tuple(self.spaces))
        if not set(columns) <= batch.column_names():
            batch = self.augment(batch)
        source = batch.arrays if set(columns) <= set(batch.arrays) else batch.parsed
        return {MEMBER: knn_estimate(source, self.cfg.member_spaces)}

    def save(self, directory: Path | str) -> Path:
        """JSON manifest + per-space files (.npz/.npy, TF-IDF as JSON + .npy): no pickle."""
        from scipy import sparse

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, space in self.spaces.items():
            np.save(directory / f"{name}_values.npy", space.values)
            if space.vectorizer is not None:
                save_vectorizer(space.vectorizer, directory, f"{name}_vectorizer")
                sparse.save_npz(directory / f"{name}_keys.npz", space.keys.tocsr())
            else:
                np.save(directory / f"{name}_keys.npy", space.keys.astype(np.float32))
        manifest = {"config": _config_dict(self.cfg), "spaces": list(self.spaces)}
        path = directory / MANIFEST
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path | str) -> NeighbourIndex:
        from scipy import sparse

        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a neighbour index directory")
        manifest = json.loads(path.read_text())
        # Typed like params.yaml (lists become tuples); an index saved before a parameter
        # existed fails naming it instead of silently taking some value for it, except those in
        # MANIFEST_DEFAULTS, which do not change the features.
        raw = {**MANIFEST_DEFAULTS, **manifest["config"], "spaces": manifest["spaces"]}
        cfg = section_from_dict(NeighboursConfig, raw, "neighbours", source=str(path))
        spaces = {}
        for name in manifest["spaces"]:
            values = np.load(directory / f"{name}_values.npy")
            if name.startswith("tfidf_"):
                vectorizer = load_vectorizer(directory, f"{name}_vectorizer")
                keys = sparse.load_npz(directory / f"{name}_keys.npz").tocsr()
                spaces[name] = _Space(name, keys, values, vectorizer)
            else:
                keys = np.load(directory / f"{name}_keys.npy").astype(np.float32)
                spaces[name] = _Space(name, keys, values)
        return cls(cfg, spaces)


def _config_dict(cfg: NeighboursConfig) -> dict[str, Any]:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def knn_estimate(
    features: pd.DataFrame | Mapping[str, np.ndarray], spaces: tuple[str, ...]
) -> np.ndarray:
    """The neighbour member: the mean over `spaces` of their weighted-mean neighbour log price
    (spaces without a value for a row, e.g. image, are skipped for it). `features`: the
    neighbour columns, as a table or as arrays by name.

    Summed in numpy in space order and divided by the count, as pandas' `mean(axis=1,
    skipna=True)` does, without its per-call cost on a served row."""
    columns = [f"{PREFIX}{space}_mean" for space in spaces]
    missing = [c for c in columns if c not in features]
    if missing:
        raise ValueError(
            f"neighbour features lack {missing}: add those spaces to neighbours.spaces"
        )
    values = np.column_stack([np.asarray(features[c], dtype=np.float64) for c in columns])
    present = ~np.isnan(values)
    count = present.sum(axis=1)
    if (count == 0).any():
        raise ValueError("a row has no neighbour estimate in any of the member spaces")
    return np.where(present, values, 0.0).sum(axis=1) / count
