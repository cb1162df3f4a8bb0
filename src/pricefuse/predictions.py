"""Read the members' prediction files into one aligned table.

Every training stage writes log1p predictions keyed by sample_id (OOF: + fold). The ensemble and
the reports need them side by side, in the parsed table's row order, with a loud error when a
member is missing rows (a stale or partial upstream output must not be blended silently).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pricefuse.errors import StageError
from pricefuse.layout import FOLD, ID, Layout

PRODUCERS = ("fusion", "gbdt")


def member_predictions(
    layout: Layout, split: str, members: Sequence[str], ids: pd.Series
) -> pd.DataFrame:
    """DataFrame with one column per member (log1p), rows aligned to `ids` (parsed order)."""
    found: dict[str, pd.Series] = {}
    for producer in PRODUCERS:
        path: Path = (
            layout.oof_predictions(producer)
            if split == "train"
            else layout.test_predictions(producer)
        )
        if not path.exists():
            continue
        frame = pd.read_parquet(path).set_index(ID)
        for column in frame.columns:
            if column != FOLD:
                found[column] = frame[column]
    unknown = [m for m in members if m not in found]
    if unknown:
        raise StageError(
            f"no {split} predictions for member(s) {unknown}; available: {sorted(found)}. "
            "Check ensemble.members in params.yaml and that the training stages ran."
        )
    out = pd.DataFrame({m: found[m].reindex(ids.to_numpy()).to_numpy() for m in members})
    gaps = out.isna().any(axis=1)
    if gaps.any():
        raise StageError(
            f"{int(gaps.sum())} {split} row(s) lack a prediction from some member, e.g. sample_id "
            f"{list(ids[gaps.to_numpy()].head(5))}: re-run the training stages (dvc repro)."
        )
    return out
