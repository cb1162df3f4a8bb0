"""SMAPE (the competition metric) and per-bucket reports. Always on prices, in percent."""

from __future__ import annotations

import numpy as np
import pandas as pd


def smape(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Symmetric mean absolute percentage error in percent (0-200).

    A pair where both values are 0 contributes 0 (the competition's convention avoids 0/0).
    """
    a = np.asarray(actual, dtype=np.float64).ravel()
    f = np.asarray(predicted, dtype=np.float64).ravel()
    if a.shape != f.shape:
        raise ValueError(f"smape: shapes differ ({a.shape} vs {f.shape})")
    if a.size == 0:
        raise ValueError("smape: no values")
    if not (np.isfinite(a).all() and np.isfinite(f).all()):
        raise ValueError("smape: non-finite values")
    denom = (np.abs(a) + np.abs(f)) / 2.0
    ratio = np.divide(np.abs(f - a), denom, out=np.zeros_like(a), where=denom > 0)
    return float(100.0 * ratio.mean())


def smape_from_log(actual_log: np.ndarray, predicted_log: np.ndarray) -> float:
    """SMAPE on prices for targets and predictions given in log1p space."""
    return smape(np.expm1(actual_log), np.expm1(predicted_log))


def smape_by_bucket(
    actual: np.ndarray, predicted: np.ndarray, buckets: np.ndarray | pd.Series
) -> pd.DataFrame:
    """SMAPE and row count per bucket (e.g. price quantile, unit, has_image)."""
    frame = pd.DataFrame({"a": actual, "f": predicted, "b": np.asarray(buckets)})
    rows = [
        {"bucket": key, "n": len(group), "smape": smape(group["a"].values, group["f"].values)}
        for key, group in frame.groupby("b", sort=True)
    ]
    return pd.DataFrame(rows)


def price_quantile_buckets(prices: np.ndarray, n: int = 5) -> np.ndarray:
    """Label each price with its quantile bucket, for per-bucket reports."""
    return pd.qcut(np.asarray(prices), q=n, labels=False, duplicates="drop")
