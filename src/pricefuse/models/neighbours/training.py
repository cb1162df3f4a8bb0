"""Neighbour features of the train rows without leaks: each fold's rows see an index (and TF-IDF
vocabularies) fitted on the other folds only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from pricefuse.core.config import NeighboursConfig
from pricefuse.models.neighbours.predictor import NeighbourIndex
from pricefuse.models.neighbours.search import NeighbourRows


def oof_features(
    cfg: NeighboursConfig,
    rows: NeighbourRows,
    values: np.ndarray,
    folds: np.ndarray,
    on_fold_done: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Neighbour features of train rows, each from an index fitted on the other folds only."""
    folds = np.asarray(folds)
    values = np.asarray(values, dtype=np.float64)
    out: pd.DataFrame | None = None
    for k in sorted(set(folds.tolist())):
        held = np.flatnonzero(folds == k)
        rest = np.flatnonzero(folds != k)
        index = NeighbourIndex.fit(cfg, rows.take(rest), values[rest])
        block = index.features(rows.take(held))
        if out is None:
            out = pd.DataFrame(np.nan, index=range(len(rows)), columns=block.columns)
        out.iloc[held] = block.to_numpy()
        if on_fold_done is not None:
            on_fold_done(int(k))
    if out is None:
        raise ValueError("oof_features needs at least one fold")
    return out
