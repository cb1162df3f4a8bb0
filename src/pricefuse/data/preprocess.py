"""The `preprocess` stage's work: raw splits -> parsed tables with cached images and group folds.

Every downstream model reads these tables, so this is where the target rules live (which train
rows are dropped, each under a counted reason, price outliers included when
`outlier_quantile` > 0), where the text cleaning options apply (pricefuse.data.text_clean),
where cached images are attached (only those the fetch manifest vouches for and that are still
on disk), and where cross-validation folds are fixed once for the whole pipeline.
`preprocess` returns what the stage records; it never calls MLflow, so it is tested on plain
frames.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.core.config import PreprocessConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import (
    FOLD,
    HAS_IMAGE,
    IMAGE_OK_STATUSES,
    IMAGE_PATH,
    LOG_PRICE,
    PRICE,
    Layout,
)
from pricefuse.core.records import PlotData, StageRecord
from pricefuse.data.catalog import parse_frame
from pricefuse.data.folds import assign_group_folds, fold_keys, group_ids
from pricefuse.data.images.cache import read_manifest
from pricefuse.data.raw import LINK
from pricefuse.data.text_clean import changed_rows, check_text_body, clean_parsed
from pricefuse.data.units import unit_table

# Why a train row is dropped: `clean_prices`' target rules, then the optional outlier filter.
TARGET_RULES = ("price_missing", "price_not_numeric", "price_not_finite", "price_below_min")
DROP_REASONS = (*TARGET_RULES, "price_outlier")
# Fixed 1-2-5 price bins (evenly spaced in log price): the histogram of two experiments, or of
# two data versions, then shares its bars and `dvc plots diff` can overlay them.
PRICE_EDGES = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, np.inf)


def check_n_folds(n_folds: int, train_rows: int) -> None:
    """Group K-fold needs 2 <= K <= rows; checked before any parsing so a typo fails fast."""
    if not 2 <= n_folds <= train_rows:
        raise StageError(
            f"preprocess.n_folds must be between 2 and the number of train rows "
            f"({train_rows}), got {n_folds}"
        )


def check_options(cfg: PreprocessConfig) -> None:
    """The outlier quantile and text options, checked before any parsing (a typo fails fast)."""
    if not 0.0 <= cfg.outlier_quantile < 0.5:
        raise StageError(
            f"preprocess.outlier_quantile must be in [0, 0.5), got {cfg.outlier_quantile}"
        )
    try:
        check_text_body(cfg.text_body)
    except ValueError as exc:
        raise StageError(str(exc)) from exc


def price_outliers(prices: np.ndarray, quantile: float) -> np.ndarray:
    """True where a price lies strictly below the `quantile` or above the `1 - quantile` price
    quantile of `prices` (none when quantile is 0). Why: a handful of mispriced listings (cents
    for a pallet, thousands for a sachet) pull a log-target regression far more than their share
    of the rows; the benchmark scores the filter on every held-out row, outliers included."""
    prices = np.asarray(prices, dtype=np.float64)
    if quantile <= 0.0 or prices.size == 0:
        return np.zeros(prices.shape, dtype=bool)
    low, high = np.quantile(prices, [quantile, 1.0 - quantile])
    return (prices < low) | (prices > high)


def clean_prices(frame: pd.DataFrame, min_price: float) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep train rows with a usable target; count each dropped row under its first reason.

    Adds `log_price` (log1p), the target every member trains on.
    """
    raw = frame[PRICE]
    text = raw.astype(str).str.strip()
    missing = raw.isna() | (text == "") | text.str.lower().isin(["nan", "none", "null"])
    price = pd.to_numeric(raw, errors="coerce")
    not_numeric = ~missing & price.isna()
    not_finite = ~missing & ~not_numeric & ~np.isfinite(price)
    below = ~missing & ~not_numeric & ~not_finite & (price < min_price)
    reasons = dict(zip(TARGET_RULES, (missing, not_numeric, not_finite, below), strict=True))
    keep = ~(missing | not_numeric | not_finite | below)
    kept = frame.loc[keep].copy()
    kept[PRICE] = price[keep].astype(np.float64)
    kept[LOG_PRICE] = np.log1p(kept[PRICE])
    return kept.reset_index(drop=True), {k: int(v.sum()) for k, v in reasons.items()}


def image_paths(links: pd.Series, manifest: Path) -> tuple[np.ndarray, dict[str, int]]:
    """Cached image path per row ("" when none) from the fetch manifest, and counts of why not.

    A manifest row only counts when its status is ok/cached and the file is still on disk: a
    stale manifest must not promise images that embed cannot read.
    """
    records = read_manifest(manifest)
    usable: dict[str, str] = {}
    absent = 0
    for link, record in records.items():
        if record.status in IMAGE_OK_STATUSES and record.path:
            if Path(record.path).is_file():
                usable[link] = record.path
            else:
                absent += 1
    paths = links.map(lambda link: usable.get(link, "")).to_numpy(dtype=object)
    has_link = links.str.strip() != ""
    counts = {
        "with_link": int(has_link.sum()),
        "with_image": int((paths != "").sum()),
        "not_in_manifest": int((has_link & ~links.isin(records.keys())).sum()),
        "manifest_files_absent": absent,
    }
    return paths, counts


def attach_images(parsed: pd.DataFrame, manifest: Path | None) -> dict[str, int]:
    """Set `image_path` / `has_image` in place (no manifest: no row has an image); the counts."""
    if manifest is not None:
        paths, counts = image_paths(parsed[LINK], manifest)
    else:
        paths = np.full(len(parsed), "", dtype=object)
        counts = {"with_link": int((parsed[LINK].str.strip() != "").sum()), "with_image": 0}
    parsed[IMAGE_PATH] = paths
    parsed[HAS_IMAGE] = parsed[IMAGE_PATH] != ""
    return counts


def assign_folds(train: pd.DataFrame, n_folds: int, seed: int) -> tuple[np.ndarray, int]:
    """Group folds of the train rows (near-duplicate texts or shared images stay together, so
    OOF scores are not flattered by leakage) and the number of groups."""
    text_keys, image_keys = fold_keys(train)
    try:
        folds = assign_group_folds(text_keys, image_keys, train[LOG_PRICE], n_folds, seed)
    except ValueError as exc:
        raise StageError(f"cannot assign folds: {exc}") from exc
    return np.asarray(folds), int(group_ids(text_keys, image_keys).max()) + 1


def price_histogram(prices: pd.Series) -> PlotData:
    """Train rows per price bin: the skew that motivates the log target, per data version."""
    counts = pd.cut(prices, list(PRICE_EDGES), right=False).value_counts(sort=False)
    labels = [f"{lo:g}-{hi:g}" for lo, hi in pairwise(PRICE_EDGES[:-1])]
    labels.append(f">={PRICE_EDGES[-2]:g}")
    return PlotData(
        "price_histogram",
        "bars",
        pd.DataFrame({"label": labels, "value": counts.to_numpy(dtype=float)}),
        "train rows per price bin",
    )


def preprocess(
    train_raw: pd.DataFrame,
    test_raw: pd.DataFrame,
    cfg: PreprocessConfig,
    seed: int,
    layout: Layout,
) -> StageRecord:
    """Clean targets, parse, attach images and assign folds; write `<interim_dir>/<split>.parquet`
    (row order = raw order minus dropped rows) and return what the stage records."""
    check_n_folds(cfg.n_folds, len(train_raw))
    check_options(cfg)
    manifest = layout.manifest if layout.manifest.is_file() else None
    train, drops = clean_prices(train_raw, cfg.min_price)
    outliers = price_outliers(train[PRICE].to_numpy(), cfg.outlier_quantile)
    train = train.loc[~outliers].reset_index(drop=True)
    drops["price_outlier"] = int(outliers.sum())
    if train.empty:
        raise StageError(f"no train rows left after dropping bad prices: {drops}")
    metrics: dict[str, float] = {f"dropped_{k}": v for k, v in drops.items()}
    metrics["dropped_total"] = sum(drops.values())

    tables: dict[str, pd.DataFrame] = {}
    units = []
    rows_in = {"train": len(train_raw), "test": len(test_raw)}
    for split, frame in (("train", train), ("test", test_raw)):
        parsed, report = parse_frame(frame)
        image_counts = attach_images(parsed, manifest)
        metrics.update({f"images_{split}_{k}": v for k, v in image_counts.items()})
        metrics[f"rows_in_{split}"] = rows_in[split]
        metrics[f"rows_out_{split}"] = len(parsed)
        metrics[f"unit_coverage_{split}"] = report.unit_coverage
        metrics.update(report.as_metrics(prefix=f"{split}_parse_"))
        units.append(unit_table(parsed["unit_raw"], parsed["unit"]).assign(split=split))
        tables[split] = parsed

    train = tables["train"]
    train[FOLD], n_groups = assign_folds(train, cfg.n_folds, seed)
    tables["test"][FOLD] = -1
    # cleaned after the folds: fold keys read the text as written, so every cleaning option
    # shares one set of folds and their OOF scores compare row for row
    for split, parsed in list(tables.items()):
        tables[split] = clean_parsed(parsed, cfg)
        metrics[f"text_cleaned_{split}"] = changed_rows(parsed, tables[split])
    train = tables["train"]
    sizes = np.bincount(train[FOLD], minlength=cfg.n_folds)
    metrics["n_groups"] = n_groups
    metrics.update({f"fold_rows_{k}": int(n) for k, n in enumerate(sizes)})

    layout.interim_dir.mkdir(parents=True, exist_ok=True)
    for split, parsed in tables.items():
        parsed.to_parquet(layout.parsed(split), index=False)
    summary = (
        f"preprocess: train {len(train_raw)} -> {len(train)} rows "
        f"(dropped {sum(drops.values())}), test {len(tables['test'])} rows, "
        f"{int(train[HAS_IMAGE].sum())}/{len(train)} train rows with an image, "
        f"{cfg.n_folds} group folds -> {layout.interim_dir}"
    )
    if manifest is None:
        summary += (
            f"\npreprocess: no image manifest at {layout.manifest}; has_image is False for every "
            "row (run fetch_images first to use images)"
        )
    return StageRecord(
        summary=summary,
        metrics={k: float(v) for k, v in metrics.items()},
        plots=[price_histogram(train[PRICE])],
        tables={"preprocess/unit_distribution.json": pd.concat(units, ignore_index=True)},
        tags={"image_manifest": str(layout.manifest) if manifest is not None else "none"},
        meta={
            layout.interim_dir: {
                "rows": {split: len(t) for split, t in tables.items()},
                "dropped": drops,
                "n_folds": cfg.n_folds,
                "image_manifest": manifest is not None,
            }
        },
    )
