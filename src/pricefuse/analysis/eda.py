"""Exploratory analysis of the training rows, behind `notebooks/01_eda.ipynb`.

Why a module: the notebook should only call and plot, so every figure it shows is computed by
typed, tested functions here, on the demo data in the tests and on the real rows when present.
Each function returns a DataFrame or Series and answers one question the pipeline's design
rests on: price is heavy-tailed (train on log1p), units come in many spellings (normalise them),
duplicates carry different prices (group folds), most rows have no usable image (every path
must work without one), and size and pack drive price.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pricefuse.core.config import FetchConfig, Params
from pricefuse.core.metrics import smape
from pricefuse.data.catalog import parse_catalog, parse_frame
from pricefuse.data.folds import assign_group_folds, fold_keys, text_group_key
from pricefuse.data.images.links import link_kind, local_path
from pricefuse.data.units import unit_kind, unit_table

DATA_ENV = "PRICEFUSE_EDA_DATA"  # a train CSV, or a folder holding train.csv (and images/)
DEMO_ROWS_ENV = "PRICEFUSE_EDA_DEMO_ROWS"  # train rows when the demo has to be generated
REAL_DATA = Path("..") / "shared" / "data" / "amazon2025"  # relative to the repo root
DEMO_DATA = Path("data") / "raw" / "demo"

SourceKind = Literal["env", "real", "demo", "generated demo"]
ImageStatus = Literal["no link", "not found", "undecodable", "ok"]
IMAGE_STATUSES: tuple[ImageStatus, ...] = ("no link", "not found", "undecodable", "ok")


@dataclass(frozen=True)
class DataSource:
    """Where the analysed rows come from; relative image links resolve against `root`."""

    kind: SourceKind
    train_csv: Path
    images_dir: Path | None
    root: Path

    def describe(self) -> str:
        what = {
            "env": f"rows named by ${DATA_ENV}",
            "real": "the REAL competition rows (outputs must not be committed)",
            "demo": "the synthetic demo rows",
            "generated demo": "synthetic demo rows generated for this analysis",
        }[self.kind]
        images = f"; images also looked up in {self.images_dir}" if self.images_dir else ""
        return f"Data: {what}: {self.train_csv}{images}"


def find_root(start: Path | str = ".") -> Path:
    """The repo root: the nearest folder at or above `start` holding params.yaml.

    Why: the notebook runs with its own folder as cwd in Jupyter and with the root as cwd in
    the tests; both must find the same data.
    """
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / "params.yaml").is_file():
            return folder
    return start


def _images_next_to(csv: Path) -> Path | None:
    images = csv.parent / "images"
    return images if images.is_dir() else None


def project_params(root: Path) -> Params:
    """params.yaml of `root`, else of the checkout this module belongs to: the demo settings and
    the image limits the analysis shares with the pipeline come from the one parameter file."""
    from pricefuse.core.config import load_params

    for candidate in (root / "params.yaml", Path(__file__).resolve().parents[3] / "params.yaml"):
        if candidate.is_file():
            return load_params(candidate)
    return load_params(root / "params.yaml")  # raises ConfigError naming the missing file


def _generate_demo(root: Path, n_train: int | None) -> Path:
    """Demo rows from the project's demo settings, in a temp folder (never over DVC outputs)."""
    from dataclasses import replace

    from pricefuse.data.demo import generate_demo

    params = project_params(root)
    cfg = params.demo
    if n_train is not None:
        cfg = replace(cfg, n_train=n_train, n_test=max(1, n_train // 10))
    out = Path(tempfile.mkdtemp(prefix="pricefuse-eda-"))
    generate_demo(cfg, seed=params.seed, out_dir=out)
    return out / "train.csv"


def choose_source(root: Path | str, env: Mapping[str, str] | None = None) -> DataSource:
    """Pick the rows to analyse: ${PRICEFUSE_EDA_DATA}, else the real rows next to the repo,
    else the demo rows (generated into a temp folder when `data/raw/demo` has none).

    ${PRICEFUSE_EDA_DEMO_ROWS} sets the number of generated demo rows (the tests keep it small).
    """
    root = Path(root).resolve()
    env = os.environ if env is None else env
    override = env.get(DATA_ENV, "").strip()
    if override:
        path = Path(override)
        path = path if path.is_absolute() else root / path
        csv = path / "train.csv" if path.is_dir() else path
        if not csv.is_file():
            raise FileNotFoundError(f"${DATA_ENV}={override}: no train CSV at {csv}")
        return DataSource("env", csv, _images_next_to(csv), root)
    real = root / REAL_DATA / "train.csv"
    if real.is_file():
        return DataSource("real", real.resolve(), _images_next_to(real.resolve()), root)
    demo = root / DEMO_DATA / "train.csv"
    if demo.is_file():
        return DataSource("demo", demo, _images_next_to(demo), root)
    rows = env.get(DEMO_ROWS_ENV, "").strip()
    csv = _generate_demo(root, int(rows) if rows else None)
    return DataSource("generated demo", csv, _images_next_to(csv), root)


def resolve_image_file(link: object, root: Path, images_dir: Path | None) -> str:
    """Local file of an image link, or "" when there is no link or no such file.

    Disk links (demo) are tried relative to the repo root; any link is also looked up by its
    last path segment in `images_dir`, which is how the shared real images are named.
    """
    if not isinstance(link, str) or not link.strip():
        return ""
    link = link.strip()
    candidates: list[Path] = []
    if link_kind(link) == "file":
        path = local_path(link)
        candidates.append(path if path.is_absolute() else root / path)
    if images_dir is not None:
        name = Path(urllib.parse.urlsplit(link).path).name
        if name:
            candidates.append(images_dir / name)
    return next((str(p) for p in candidates if p.is_file()), "")


def file_sha256(path: str) -> str:
    """Hash of a file's bytes ("" for no file): equal hashes are the same image, whatever link."""
    if not path:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_status(links: Sequence[object], files: Sequence[str], cfg: FetchConfig) -> pd.Series:
    """Per row: "no link", "not found" (link, no local file), "undecodable" or "ok".

    Decoding uses the pipeline's own validator, so "ok" means what the image encoder will see.
    """
    from pricefuse.data.images.validate import ImageRejected, validate_image

    def one(link: object, file: str) -> ImageStatus:
        if not isinstance(link, str) or not link.strip():
            return "no link"
        if not file:
            return "not found"
        try:
            validate_image(Path(file).read_bytes(), cfg)
        except ImageRejected:
            return "undecodable"
        return "ok"

    statuses = [one(link, file) for link, file in zip(links, files, strict=True)]
    return pd.Series(pd.Categorical(statuses, categories=IMAGE_STATUSES), name="image_status")


def load_train(source: DataSource) -> pd.DataFrame:
    """The train rows parsed as the pipeline parses them, plus image columns.

    Added: `log_price`, `image_file` (local path or ""), `image_status`, `has_image`
    (decodable), `image_sha256` (of the file's bytes, "" when there is no file).
    """
    raw = pd.read_csv(source.train_csv, keep_default_na=False, na_values={"price": [""]})
    parsed, _ = parse_frame(raw)
    parsed = parsed.dropna(subset=["price"]).reset_index(drop=True)
    parsed["log_price"] = np.log1p(parsed["price"].astype(float))
    links = parsed["image_link"].tolist() if "image_link" in parsed else [""] * len(parsed)
    files = [resolve_image_file(link, source.root, source.images_dir) for link in links]
    parsed["image_file"] = files
    fetch = project_params(source.root).fetch
    parsed["image_status"] = image_status(links, files, fetch).to_numpy()
    parsed["has_image"] = parsed["image_status"] == "ok"
    parsed["image_sha256"] = [file_sha256(f) for f in files]
    return parsed


# --- price skew ------------------------------------------------------------------------------


def price_summary(prices: Sequence[float] | pd.Series) -> pd.DataFrame:
    """Quantiles, skewness and excess kurtosis of price and of log1p(price), side by side.

    Why: a right-skewed target makes squared-error training chase the few expensive products;
    log1p(price) is close to symmetric, and an error there is a relative error, which is what
    SMAPE measures.
    """
    price = pd.Series(np.asarray(prices, dtype=np.float64))
    rows = {}
    for name, values in (("price", price), ("log1p(price)", np.log1p(price))):
        q = values.quantile([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
        rows[name] = {
            "count": float(values.size),
            "mean": values.mean(),
            "std": values.std(),
            "min": values.min(),
            **{f"p{round(k * 100):02d}": v for k, v in q.items()},
            "max": values.max(),
            "skewness": values.skew(),
            "excess kurtosis": values.kurt(),
        }
    return pd.DataFrame(rows)


def constant_smape(prices: Sequence[float] | pd.Series) -> pd.Series:
    """SMAPE of predicting one constant for every row: the mean, the median, expm1(mean log1p).

    Why: shows the metric's preference in one line. The arithmetic mean is pulled up by the
    tail and scores worst; the log-space mean (what a model trained on log1p converges to)
    is close to the median, the best constant.
    """
    price = np.asarray(prices, dtype=np.float64)
    centres = {
        "mean": price.mean(),
        "median": np.median(price),
        "expm1(mean log1p)": np.expm1(np.log1p(price).mean()),
    }
    return pd.Series(
        {k: smape(price, np.full_like(price, v)) for k, v in centres.items()},
        name="SMAPE of a constant (%)",
    )


# --- units -----------------------------------------------------------------------------------


def unit_spellings(parsed: pd.DataFrame) -> pd.DataFrame:
    """Every raw `Unit:` spelling with the canonical unit and kind it maps to, most rows first."""
    table = unit_table(parsed["unit_raw"].tolist(), parsed["unit"].tolist())
    table.insert(2, "kind", [unit_kind(u) for u in table["unit"]])
    return table


def units_by_canonical(parsed: pd.DataFrame) -> pd.DataFrame:
    """One row per canonical unit: rows, number of raw spellings and the spellings themselves.

    Why: shows how many spellings the parser folds into each unit the model sees.
    """
    table = unit_spellings(parsed)
    grouped = table.groupby(["unit", "kind"], sort=False)
    out = pd.DataFrame(
        {
            "rows": grouped["rows"].sum(),
            "spellings": grouped["unit_raw"].size(),
            "examples": grouped["unit_raw"].agg(lambda s: ", ".join(map(repr, s))),
        }
    ).reset_index()
    out["share"] = out["rows"] / max(len(parsed), 1)
    return out.sort_values(["rows", "unit"], ascending=[False, True], ignore_index=True)


PARSE_PROBLEMS = ("value missing", "value malformed", "unit missing", "unit none", "unit unknown")


def parse_failures(parsed: pd.DataFrame) -> pd.DataFrame:
    """Rows whose Value or Unit could not be used, with the raw text and the problem.

    Problems: no Value line or a null token ("value missing"), a Value that is not a number
    ("value malformed"), no Unit line, an explicit "None" unit, a spelling the parser does not
    know ("unit unknown", mapped to "other"). These rows get the parser's defaults (value 1.0,
    unit "none"/"other") and the model has to rely on the text instead. An absent line shows
    as "<missing>", next to explicit null tokens such as "nan" or "None".
    """
    raw_values = [parse_catalog(t).value_raw for t in parsed["catalog_content"]]
    problems: list[str] = []
    for raw, missing, unit_missing, unit in zip(
        raw_values, parsed["value_missing"], parsed["unit_missing"], parsed["unit"], strict=True
    ):
        found = []
        if missing:
            null = raw is None or raw.strip().lower() in {"", "nan", "none", "null", "n/a", "na"}
            found.append("value missing" if null else "value malformed")
        if unit_missing:
            found.append("unit missing")
        elif unit == "none":
            found.append("unit none")
        elif unit == "other":
            found.append("unit unknown")
        problems.append(", ".join(found))
    frame = pd.DataFrame(
        {
            "value_raw": ["<missing>" if r is None else r for r in raw_values],
            "unit_raw": ["<missing>" if r is None else r for r in parsed["unit_raw"]],
            "problem": problems,
            "item_name": parsed["item_name"],
            "price": parsed.get("price", np.nan),
        },
        index=parsed.index,
    )
    return frame[frame["problem"] != ""]


def parse_failure_counts(failures: pd.DataFrame, rows: int) -> pd.DataFrame:
    """Rows per parse problem (a row may have two), and their share of all `rows`."""
    problem = failures["problem"]
    counts = {p: int(problem.str.contains(p, regex=False).sum()) for p in PARSE_PROBLEMS}
    out = pd.DataFrame({"problem": list(counts), "rows": list(counts.values())})
    out["share"] = out["rows"] / max(rows, 1)
    return out


# --- duplicates ------------------------------------------------------------------------------


def duplicate_groups(keys: Sequence[object], prices: Sequence[float]) -> pd.DataFrame:
    """Keys shared by two or more rows, with the spread of their prices, widest spread first.

    Empty keys (no text, no image) link nothing. `ratio` is max/min price: a group with ratio
    3 holds the "same" product at three times the price of its copy.
    """
    frame = pd.DataFrame({"key": list(keys), "price": np.asarray(prices, dtype=np.float64)})
    frame = frame[[isinstance(k, str) and bool(k.strip()) for k in frame["key"]]]
    columns = ["key", "rows", "distinct_prices", "min_price", "median_price", "max_price", "ratio"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    grouped = frame.groupby("key", sort=False)["price"]
    out = pd.DataFrame(
        {
            "rows": grouped.size(),
            "distinct_prices": grouped.nunique(),
            "min_price": grouped.min(),
            "median_price": grouped.median(),
            "max_price": grouped.max(),
        }
    )
    out = out[out["rows"] >= 2].reset_index()
    out["ratio"] = out["max_price"] / out["min_price"].clip(lower=1e-9)
    return out[columns].sort_values(["ratio", "rows"], ascending=False, ignore_index=True)


def duplicate_keys(parsed: pd.DataFrame) -> dict[str, list[str]]:
    """The ways two rows can be "the same product", one key list per way.

    - same catalog_content (exact text);
    - same text once case, punctuation and spacing are dropped (Value/Unit lines aside);
    - same normalised item name (the text key the group folds use, `folds.fold_keys`);
    - same image link; same image file bytes (sha256, only rows with a local file).
    """
    text_keys, _ = fold_keys(parsed)
    links = parsed["image_link"] if "image_link" in parsed else pd.Series([""] * len(parsed))
    return {
        "catalog_content": [t if isinstance(t, str) else "" for t in parsed["catalog_content"]],
        "text, normalised": text_group_key(parsed["text"]),
        "item name (fold key)": text_keys,
        "image link": [lk.strip() if isinstance(lk, str) else "" for lk in links],
        "image bytes": list(parsed["image_sha256"]) if "image_sha256" in parsed else [],
    }


def duplicate_summary(
    keys: Mapping[str, Sequence[object]], prices: Sequence[float]
) -> pd.DataFrame:
    """Per kind of key: duplicate groups, rows in them, groups whose prices differ, worst ratio."""
    rows = []
    for name, key_list in keys.items():
        if len(key_list) == 0:
            continue
        groups = duplicate_groups(key_list, prices)
        differ = groups[groups["distinct_prices"] > 1]
        rows.append(
            {
                "key": name,
                "groups": len(groups),
                "rows_in_groups": int(groups["rows"].sum()),
                "groups_with_different_prices": len(differ),
                "median_ratio": float(differ["ratio"].median()) if len(differ) else np.nan,
                "max_ratio": float(differ["ratio"].max()) if len(differ) else np.nan,
            }
        )
    return pd.DataFrame(rows)


def duplicate_examples(
    parsed: pd.DataFrame, keys: Sequence[object], top: int = 3, columns: Sequence[str] = ()
) -> pd.DataFrame:
    """The rows of the `top` duplicate groups with the widest price spread, group by group.

    `columns` picks what to show of each row (default: sample_id, item_name, price).
    """
    shown = list(columns) or [c for c in ("sample_id", "item_name", "price") if c in parsed]
    groups = duplicate_groups(keys, parsed["price"])
    groups = groups[groups["distinct_prices"] > 1].head(top)
    key_series = pd.Series(list(keys), index=parsed.index)
    parts = []
    for rank, (key, ratio) in enumerate(zip(groups["key"], groups["ratio"], strict=True), 1):
        part = parsed.loc[key_series == key, shown].sort_values("price")
        parts.append(part.assign(group=rank, ratio=round(float(ratio), 2)))
    if not parts:
        return pd.DataFrame(columns=["group", "ratio", *shown])
    return pd.concat(parts)[["group", "ratio", *shown]].reset_index(drop=True)


def groups_split_across_folds(keys: Sequence[object], folds: Sequence[int]) -> int:
    """How many duplicate groups (same non-empty key) have rows in more than one fold.

    Each such group leaks: its twin is in the training part when the other copy is scored.
    """
    frame = pd.DataFrame({"key": list(keys), "fold": np.asarray(folds)})
    frame = frame[[isinstance(k, str) and bool(k.strip()) for k in frame["key"]]]
    per_key = frame.groupby("key")["fold"].agg(["size", "nunique"])
    return int(((per_key["size"] >= 2) & (per_key["nunique"] > 1)).sum())


def fold_leakage(
    parsed: pd.DataFrame, keys: Mapping[str, Sequence[object]], n_folds: int = 5, seed: int = 0
) -> pd.DataFrame:
    """Duplicate groups split across folds: random K-fold vs the project's group folds.

    Why the project uses `pricefuse.data.folds.assign_group_folds`: with random folds, copies of
    one product land on both sides of a split and OOF scores look better than the test score.
    Group folds link rows sharing a text key or an image key (here: the local image file,
    else the link) and keep each linked group in one fold.
    """
    rng = np.random.default_rng(seed)
    n = len(parsed)
    random_folds = rng.permutation(np.arange(n) % n_folds)
    text_keys, image_keys = fold_keys(
        parsed.assign(image_path=parsed.get("image_file", pd.Series([""] * n)))
    )
    group_folds = assign_group_folds(
        text_keys, image_keys, np.log1p(parsed["price"].to_numpy(float)), n_folds, seed
    )
    rows = []
    for name, key_list in keys.items():
        if len(key_list) == 0:
            continue
        rows.append(
            {
                "key": name,
                "groups": len(duplicate_groups(key_list, parsed["price"])),
                "split by random folds": groups_split_across_folds(key_list, random_folds),
                "split by group folds": groups_split_across_folds(key_list, group_folds),
            }
        )
    return pd.DataFrame(rows)


# --- images, text length, pack ---------------------------------------------------------------


def image_availability(statuses: Sequence[str] | pd.Series) -> pd.DataFrame:
    """The funnel from rows to usable images: with a link, link found locally, decodable."""
    s = pd.Series(np.asarray(statuses, dtype=object))
    n = len(s)
    stages = {
        "rows": n,
        "with a link": int((s != "no link").sum()),
        "link resolves to a local file": int(s.isin(["undecodable", "ok"]).sum()),
        "file decodes": int((s == "ok").sum()),
    }
    out = pd.DataFrame({"stage": list(stages), "rows": list(stages.values())})
    out["share"] = out["rows"] / max(n, 1)
    return out


def price_by(labels: Sequence[object] | pd.Series, prices: Sequence[float]) -> pd.DataFrame:
    """Rows and price quantiles per label (e.g. has_image, unit kind, pack size bucket).

    Categorical labels keep their category order (pack buckets read 1, 2, ..., 12+).
    """
    frame = pd.DataFrame(
        {"label": pd.Series(labels).reset_index(drop=True), "price": np.asarray(prices, float)}
    )
    grouped = frame.groupby("label", sort=True, observed=True)["price"]
    return pd.DataFrame(
        {
            "rows": grouped.size(),
            "p25": grouped.quantile(0.25),
            "median": grouped.median(),
            "p75": grouped.quantile(0.75),
            "mean": grouped.mean(),
        }
    ).reset_index()


def binned_price(
    values: Sequence[float] | pd.Series, prices: Sequence[float], n_bins: int = 5
) -> pd.DataFrame:
    """Price per quantile bin of `values` (e.g. text length), with the bin's range."""
    x = pd.Series(np.asarray(values, dtype=np.float64))
    bins = pd.qcut(x.rank(method="first"), q=min(n_bins, max(len(x), 1)), labels=False)
    frame = pd.DataFrame({"bin": bins, "x": x, "price": np.asarray(prices, dtype=float)})
    grouped = frame.groupby("bin")
    out = pd.DataFrame(
        {
            "from": grouped["x"].min(),
            "to": grouped["x"].max(),
            "rows": grouped.size(),
            "median_price": grouped["price"].median(),
        }
    )
    return out.reset_index(drop=True)


PACK_EDGES = (1, 2, 3, 4, 6, 12, np.inf)
PACK_LABELS = ("1", "2", "3", "4-5", "6-11", "12+")


def pack_bucket(packs: Sequence[int] | pd.Series) -> pd.Series:
    """Pack counts grouped for display: 1, 2, 3, 4-5, 6-11, 12+ (ordered categories)."""
    cut = pd.cut(
        np.asarray(packs, dtype=float), bins=list(PACK_EDGES), labels=list(PACK_LABELS), right=False
    )
    return pd.Series(cut, name="pack")


def spearman(values: Sequence[float] | pd.Series, prices: Sequence[float]) -> float:
    """Rank correlation with price: monotone strength, blind to the price scale and its tail."""
    x = pd.Series(np.asarray(values, dtype=np.float64))
    y = pd.Series(np.asarray(prices, dtype=np.float64))
    return float(x.rank().corr(y.rank()))
