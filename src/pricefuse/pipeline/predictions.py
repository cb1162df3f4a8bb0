"""Write each producer's prediction files, and read the members' into one aligned table.

Every training stage writes log1p predictions keyed by sample_id (OOF: + fold) into its model
directory; which file holds which member comes from the registry (`pricefuse.pipeline.members`). The
ensemble and the reports need them side by side, in the parsed table's row order, with a loud
error when a member is missing rows (a stale or partial upstream output must not be blended
silently).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.core.config import Params
from pricefuse.core.errors import StageError
from pricefuse.core.layout import FOLD, ID, Layout
from pricefuse.pipeline.members import UnknownMemberError, producer_of


def member_predictions(
    params: Params, split: str, members: Sequence[str], ids: pd.Series
) -> pd.DataFrame:
    """DataFrame with one column per member (log1p), rows aligned to `ids` (parsed order)."""
    layout = Layout(params.data)
    columns: dict[str, pd.Series] = {}
    for member in members:
        try:
            producer = producer_of(member, params)
        except UnknownMemberError as exc:
            raise StageError(str(exc)) from exc
        path = (
            layout.oof_predictions(producer.name)
            if split == "train"
            else layout.test_predictions(producer.name)
        )
        if not path.exists():
            raise StageError(
                f"no {split} predictions for member {member!r}: {path} is missing. "
                f"Run its stage (`pricefuse {producer.stage.replace('_', '-')}` or dvc repro)."
            )
        frame = pd.read_parquet(path).set_index(ID)
        if member not in frame.columns:
            raise StageError(
                f"{path} has no column {member!r} (it holds {sorted(frame.columns)}): "
                f"re-run {producer.stage} with the current params"
            )
        columns[member] = frame[member]
    out = pd.DataFrame({m: columns[m].reindex(ids.to_numpy()).to_numpy() for m in members})
    gaps = out.isna().any(axis=1)
    if gaps.any():
        raise StageError(
            f"{int(gaps.sum())} {split} row(s) lack a prediction from some member, e.g. sample_id "
            f"{list(ids[gaps.to_numpy()].head(5))}: re-run the training stages (dvc repro)."
        )
    return out


def write_member_predictions(
    layout: Layout,
    producer: str,
    train_ids: pd.Series,
    folds: np.ndarray,
    oof: Mapping[str, np.ndarray],
    test_ids: pd.Series,
    test: Mapping[str, np.ndarray],
) -> list[Path]:
    """Write a producer's OOF (`sample_id`, `fold`, one column per member) and test predictions
    (`sample_id`, one column per member), log1p, where `member_predictions` reads them."""
    oof_path, test_path = layout.oof_predictions(producer), layout.test_predictions(producer)
    oof_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({ID: np.asarray(train_ids), FOLD: np.asarray(folds), **oof}).to_parquet(
        oof_path, index=False
    )
    pd.DataFrame({ID: np.asarray(test_ids), **test}).to_parquet(test_path, index=False)
    return [oof_path, test_path]
