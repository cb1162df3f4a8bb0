"""The linear member's K-fold loop: each fold's vectorizers and ridge fitted on the other folds,
then one fit on every train row for test and serving."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pricefuse.core.config import LinearConfig
from pricefuse.core.metrics import smape_from_log
from pricefuse.models.linear.predictor import LinearPredictor


@dataclass
class LinearFit:
    """OOF predictions (each fold fitted without it), per-fold SMAPE, and the full fit."""

    oof: np.ndarray
    fold_smape: dict[int, float]
    smape_oof: float
    predictor: LinearPredictor


def fit_linear(
    cfg: LinearConfig,
    parsed: pd.DataFrame,
    y: np.ndarray,
    folds: np.ndarray,
    on_fold_done: Callable[[int], None] | None = None,
) -> LinearFit:
    """K-fold OOF predictions, then one fit on every row for test and serving."""
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    fold_ids = sorted(set(folds.tolist()))
    if len(fold_ids) < 2 or min(fold_ids) < 0:
        raise ValueError(f"need fold ids 0..K-1 with K >= 2, got {fold_ids}")
    oof = np.zeros(len(y))
    fold_smape: dict[int, float] = {}
    for k in fold_ids:
        held = folds == k
        model = LinearPredictor.fit(cfg, parsed[~held], y[~held])
        oof[held] = model.predict(parsed[held])
        fold_smape[int(k)] = smape_from_log(y[held], oof[held])
        if on_fold_done is not None:
            on_fold_done(int(k))
    full = LinearPredictor.fit(cfg, parsed, y)
    return LinearFit(oof, fold_smape, smape_from_log(y, oof), full)
