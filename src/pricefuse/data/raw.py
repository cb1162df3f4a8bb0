"""The raw competition CSVs: what a split must hold before any stage trusts it.

Why checked at the door: a missing column or a repeated `sample_id` otherwise surfaces stages
later as a KeyError or as predictions joined onto the wrong rows; one clear error naming the file
and the columns found is cheaper to act on.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pricefuse.core.config import DataConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, PRICE, SPLITS

LINK = "image_link"
REQUIRED = {"train": (ID, "catalog_content", PRICE), "test": (ID, "catalog_content")}


def read_raw(path: str | Path, split: str) -> pd.DataFrame:
    """Read one raw CSV and check the columns and ids; a clear StageError otherwise.

    Prices are read as text (`clean_prices` decides what is a usable target and counts the rest)
    and a missing `image_link` column becomes empty links (rows without an image).
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(
            f"{split} CSV {path} not found: set data.{split}_csv in params.yaml "
            "(or run `pricefuse demo-data` for the demo set)"
        )
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={PRICE: str})
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
    if LINK not in frame.columns:
        frame[LINK] = ""
    frame[LINK] = frame[LINK].fillna("").astype(str)
    return frame


def read_raw_splits(data: DataConfig) -> dict[str, pd.DataFrame]:
    """Both raw splits of `data`, checked by `read_raw`, keyed "train" and "test"."""
    paths = {"train": data.train_csv, "test": data.test_csv}
    return {split: read_raw(paths[split], split) for split in SPLITS}
