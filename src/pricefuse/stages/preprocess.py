"""Stage `preprocess`: raw CSVs + image manifest -> parsed tables with group folds.

Every downstream model reads these tables, so this is where rows are dropped (with reasons
counted in MLflow), cached images are attached, and cross-validation folds are fixed once for
the whole pipeline.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pricefuse import tracking
from pricefuse.config import Params
from pricefuse.data.catalog import ParseReport, parse_frame
from pricefuse.data.folds import assign_group_folds, fold_keys, group_ids
from pricefuse.data.images import read_manifest
from pricefuse.data.units import unit_table
from pricefuse.errors import StageError
from pricefuse.layout import (
    FOLD,
    HAS_IMAGE,
    ID,
    IMAGE_OK_STATUSES,
    IMAGE_PATH,
    LOG_PRICE,
    PRICE,
    Layout,
)

STAGE = "preprocess"
REQUIRED = {"train": (ID, "catalog_content", PRICE), "test": (ID, "catalog_content")}
DROP_REASONS = ("price_missing", "price_not_numeric", "price_not_finite", "price_below_min")


def read_raw(path: str | Path, split: str) -> pd.DataFrame:
    """Read one raw CSV and check the columns this stage needs; a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise StageError(
            f"{split} CSV {path} not found: set data.{split}_csv in params.yaml "
            "(or run `pricefuse demo-data` for the demo set)"
        )
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"price": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise StageError(f"{split} CSV {path} is not a readable CSV: {exc}") from exc
    missing = [c for c in REQUIRED[split] if c not in frame.columns]
    if missing:
        raise StageError(
            f"{split} CSV {path} lacks column(s) {', '.join(missing)}; "
            f"found {', '.join(map(str, frame.columns))}"
        )
    duplicated = frame[ID].duplicated()
    if duplicated.any():
        examples = ", ".join(map(str, frame.loc[duplicated, ID].head(3)))
        raise StageError(f"{split} CSV {path} repeats {ID} values (e.g. {examples})")
    if "image_link" not in frame.columns:
        frame["image_link"] = ""
    frame["image_link"] = frame["image_link"].fillna("").astype(str)
    return frame


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


def clean_prices(frame: pd.DataFrame, min_price: float) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep train rows with a usable target; count each dropped row under its first reason."""
    raw = frame[PRICE]
    text = raw.astype(str).str.strip()
    missing = raw.isna() | (text == "") | text.str.lower().isin(["nan", "none", "null"])
    price = pd.to_numeric(raw, errors="coerce")
    not_numeric = ~missing & price.isna()
    not_finite = ~missing & ~not_numeric & ~np.isfinite(price)
    below = ~missing & ~not_numeric & ~not_finite & (price < min_price)
    reasons = dict(zip(DROP_REASONS, (missing, not_numeric, not_finite, below), strict=True))
    keep = ~(missing | not_numeric | not_finite | below)
    kept = frame.loc[keep].copy()
    kept[PRICE] = price[keep].astype(np.float64)
    kept[LOG_PRICE] = np.log1p(kept[PRICE])
    return kept.reset_index(drop=True), {k: int(v.sum()) for k, v in reasons.items()}


def _attach_images(parsed: pd.DataFrame, manifest: Path, has_manifest: bool) -> dict[str, int]:
    if has_manifest:
        paths, counts = image_paths(parsed["image_link"], manifest)
    else:
        paths = np.full(len(parsed), "", dtype=object)
        counts = {"with_link": int((parsed["image_link"].str.strip() != "").sum())}
        counts["with_image"] = 0
    parsed[IMAGE_PATH] = paths
    parsed[HAS_IMAGE] = parsed[IMAGE_PATH] != ""
    return counts


def _log_split(split: str, rows_in: int, parsed: pd.DataFrame, report: ParseReport) -> None:
    tracking.log_metrics(
        {
            f"rows_in_{split}": rows_in,
            f"rows_out_{split}": len(parsed),
            f"unit_coverage_{split}": report.unit_coverage,
            **report.as_metrics(prefix=f"{split}_parse_"),
        }
    )


def run(params: Params) -> None:
    layout = Layout(params.data)
    raw = {
        "train": read_raw(params.data.train_csv, "train"),
        "test": read_raw(params.data.test_csv, "test"),
    }
    n_folds = params.preprocess.n_folds
    if not 2 <= n_folds <= len(raw["train"]):
        raise StageError(
            f"preprocess.n_folds must be between 2 and the number of train rows "
            f"({len(raw['train'])}), got {n_folds}"
        )
    has_manifest = layout.manifest.is_file()
    if not has_manifest:
        print(
            f"preprocess: no image manifest at {layout.manifest}; has_image is False for every row "
            "(run fetch_images first to use images)"
        )
    with tracking.stage_run(STAGE, params, inputs=[layout.images_dir]) as run:
        mlflow.set_tag("image_manifest", str(layout.manifest) if has_manifest else "none")
        train, drops = clean_prices(raw["train"], params.preprocess.min_price)
        if train.empty:
            raise StageError(f"no train rows left after dropping bad prices: {drops}")
        tracking.log_metrics({f"dropped_{k}": v for k, v in drops.items()})
        tracking.log_metrics({"dropped_total": sum(drops.values())})

        tables: dict[str, pd.DataFrame] = {}
        unit_tables = []
        for split, frame in (("train", train), ("test", raw["test"])):
            parsed, report = parse_frame(frame)
            image_counts = _attach_images(parsed, layout.manifest, has_manifest)
            tracking.log_metrics({f"images_{split}_{k}": v for k, v in image_counts.items()})
            _log_split(split, len(raw[split]), parsed, report)
            unit_tables.append(unit_table(parsed["unit_raw"], parsed["unit"]).assign(split=split))
            tables[split] = parsed

        train = tables["train"]
        text_keys, image_keys = fold_keys(train)
        try:
            train[FOLD] = assign_group_folds(
                text_keys, image_keys, train[LOG_PRICE], n_folds, params.seed
            )
        except ValueError as exc:
            raise StageError(f"cannot assign folds: {exc}") from exc
        tables["test"][FOLD] = -1
        sizes = np.bincount(train[FOLD], minlength=n_folds)
        tracking.log_metrics(
            {
                "n_groups": int(group_ids(text_keys, image_keys).max()) + 1,
                **{f"fold_rows_{k}": int(n) for k, n in enumerate(sizes)},
            }
        )

        layout.interim_dir.mkdir(parents=True, exist_ok=True)
        for split, parsed in tables.items():
            parsed.to_parquet(layout.parsed(split), index=False)
        table = pd.concat(unit_tables, ignore_index=True)
        mlflow.log_text(table.to_csv(index=False), "preprocess/unit_distribution.csv")
        tracking.write_meta(
            layout.interim_dir,
            STAGE,
            run.info.run_id,
            rows={split: len(t) for split, t in tables.items()},
            dropped=drops,
            n_folds=n_folds,
            image_manifest=has_manifest,
        )
        print(
            f"preprocess: train {len(raw['train'])} -> {len(train)} rows "
            f"(dropped {sum(drops.values())}), test {len(tables['test'])} rows, "
            f"{int(train[HAS_IMAGE].sum())}/{len(train)} train rows with an image, "
            f"{n_folds} group folds (run {run.info.run_id})"
        )
