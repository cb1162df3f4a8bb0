"""How differently the members err: the pairwise correlation of their out-of-fold errors.

Why: a blend gains over its best member only where members make different mistakes. Members
reading the same parsed, neighbour and stacked features err together (correlations near 1) and
the blend can do little with them; a member whose errors correlate less with the others' is
worth more to the ensemble than its own SMAPE says. The table is what the ensemble stage records
(`plots/ensemble/error_correlation.*`) and what `pricefuse evaluate` prints.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd


def error_correlation(y_log: np.ndarray, predictions: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Members x members Pearson correlation of the log errors (prediction - log1p price)."""
    if not predictions:
        raise ValueError("no member predictions to correlate")
    y = np.asarray(y_log, dtype=np.float64)
    errors = {}
    for name, pred in predictions.items():
        pred = np.asarray(pred, dtype=np.float64)
        if pred.shape != y.shape:
            raise ValueError(f"{name}: {pred.shape} predictions for {y.shape} targets")
        errors[name] = pred - y
    return pd.DataFrame(errors).corr(method="pearson")


def mean_pairwise(corr: pd.DataFrame) -> float:
    """The mean of the off-diagonal correlations (NaN for a single member)."""
    values = corr.to_numpy(dtype=np.float64)
    n = len(values)
    if n < 2:
        return float("nan")
    return float((values.sum() - np.trace(values)) / (n * (n - 1)))


def as_plot_frame(corr: pd.DataFrame) -> pd.DataFrame:
    """The table with the row names as a first `member` column (CSV and heatmap)."""
    frame = corr.round(4).reset_index(names="member")
    return frame


def format_table(corr: pd.DataFrame) -> str:
    """A fixed-width text table of the correlations, two decimals."""
    return corr.round(2).to_string(float_format=lambda v: f"{v:.2f}")
