"""Price intervals: split-conformal bands around the ensemble's price, from out-of-fold residuals.

Why conformal: the ensemble predicts one log1p price; how far the truth lies from it is measured
directly on rows the models never trained on (the OOF predictions). The k-th smallest absolute
log residual, k = ceil((n + 1) * level), bounds a new row's residual with probability >= level
when the new row is exchangeable with the calibration rows — no distributional assumption.

Why log space: SMAPE and the members work in log1p(price); a symmetric band there is a band of
constant *relative* width in prices (e.g. x0.6..x1.7), which is what "price ± error" means for
items from $1 to $1,000.

Why by has_image: rows without an image are priced from text alone and miss by more; one pooled
band would be too wide for one group and too narrow for the other. A group with fewer than
`MIN_GROUP_ROWS` calibration rows (e.g. a run without images) uses the pooled residuals instead:
below ~30 rows the finite-sample quantile jumps between a few residuals and the level a request
asks for is no longer what it gets.

Stored without pickle: each group's sorted residuals as .npy plus a JSON manifest, so any level in
(0, 1) is answered at request time (`level` is a per-request parameter of the served model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.models.ensemble.blend import clip_log, to_price

MANIFEST = "intervals.json"
IMAGE, TEXT_ONLY, POOLED = "image", "text_only", "pooled"
GROUPS = (IMAGE, TEXT_ONLY)
MIN_GROUP_ROWS = 30
# Levels whose coverage and width the ensemble stage logs as metrics; the plot uses a finer grid.
REPORT_LEVELS = (0.5, 0.8, 0.9, 0.95)
PLOT_LEVELS = (*np.round(np.arange(0.05, 0.951, 0.05), 2).tolist(), 0.98, 0.99)


class IntervalLevelError(ValueError):
    """An interval level outside (0, 1); the message names `interval_level`."""


def check_level(level: object) -> float:
    """`level` as a float strictly between 0 and 1, or IntervalLevelError saying what it was."""
    try:
        value = float(level)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(level, bool) or not 0.0 < value < 1.0:
        raise IntervalLevelError(
            f"interval_level must be a number strictly between 0 and 1 (e.g. 0.8 for an 80% "
            f"interval), got {level!r}"
        )
    return value


def group_names(has_image: np.ndarray) -> np.ndarray:
    """The calibration group of each row: "image" or "text_only"."""
    return np.where(np.asarray(has_image, dtype=bool), IMAGE, TEXT_ONLY)


def conformal_quantile(sorted_residuals: np.ndarray, level: float) -> float:
    """The split-conformal quantile: the ceil((n+1)*level)-th smallest residual, or +inf when
    that rank exceeds n (too few rows for the level: the honest interval is unbounded)."""
    n = len(sorted_residuals)
    # the epsilon keeps (n+1)*level = 8.000000000000002 from rounding up to the next rank
    rank = math.ceil((n + 1) * level - 1e-9)
    return math.inf if rank > n or n == 0 else float(sorted_residuals[max(rank, 1) - 1])


@dataclass(frozen=True)
class ConformalCalibration:
    """Sorted absolute log residuals per group (a small group holds the pooled ones).

    `rows` counts each group's own calibration rows; `pooled` names the groups that fell back.
    """

    residuals: dict[str, np.ndarray]
    rows: dict[str, int]
    pooled: tuple[str, ...]

    @classmethod
    def fit(
        cls, y_log: np.ndarray, log_pred: np.ndarray, has_image: np.ndarray
    ) -> ConformalCalibration:
        """Calibrate on OOF rows: y_log the true log1p prices, log_pred the OOF predictions."""
        y_log = np.asarray(y_log, dtype=np.float64)
        residual = np.abs(y_log - clip_log(log_pred))
        if len(residual) == 0 or not np.isfinite(residual).all():
            raise ValueError("conformal calibration needs at least one row and finite residuals")
        groups = group_names(has_image)
        everything = np.sort(residual)
        residuals, rows, pooled = {}, {}, []
        for group in GROUPS:
            own = residual[groups == group]
            rows[group] = len(own)
            if len(own) < MIN_GROUP_ROWS:
                pooled.append(group)
                residuals[group] = everything
            else:
                residuals[group] = np.sort(own)
        return cls(residuals, rows, tuple(pooled))

    def quantile(self, level: float, group: str) -> float:
        """The log-space half-width of `group`'s interval at `level`."""
        return conformal_quantile(self.residuals[group], check_level(level))

    def interval(
        self, log_pred: np.ndarray, has_image: np.ndarray, level: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(price_low, price_high) per row: expm1(centre -/+ q), clipped like `to_price`."""
        centre = clip_log(log_pred)
        groups = group_names(has_image)
        half = np.zeros(len(centre))
        for group in GROUPS:
            half[groups == group] = self.quantile(level, group)
        with np.errstate(invalid="ignore"):  # inf half-widths clip to the price range's ends
            return to_price(centre - half), to_price(centre + half)

    def save(self, directory: Path | str) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for group, values in self.residuals.items():
            np.save(directory / f"residuals_{group}.npy", values)
        manifest = {
            "method": "split conformal on |log1p(price) - OOF log prediction|, by has_image",
            "groups": list(self.residuals),
            "rows": self.rows,
            "pooled": list(self.pooled),
            "min_group_rows": MIN_GROUP_ROWS,
        }
        path = directory / MANIFEST
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path | str) -> ConformalCalibration:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the ensemble was saved without intervals")
        manifest = json.loads(path.read_text())
        residuals = {
            g: np.load(directory / f"residuals_{g}.npy", allow_pickle=False)
            for g in manifest["groups"]
        }
        rows = {g: int(n) for g, n in manifest["rows"].items()}
        return cls(residuals, rows, tuple(manifest["pooled"]))


def _covered(y_log: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    price = np.expm1(np.asarray(y_log, dtype=np.float64))
    return (low <= price) & (price <= high)


def cross_fitted_coverage(
    y_log: np.ndarray,
    log_pred: np.ndarray,
    has_image: np.ndarray,
    folds: np.ndarray,
    level: float,
) -> np.ndarray:
    """Per row: is it inside the interval calibrated on the *other* folds' rows? The honest
    figure — the in-sample coverage calibrates on the rows it then covers."""
    y_log, log_pred = np.asarray(y_log, np.float64), np.asarray(log_pred, np.float64)
    has_image, folds = np.asarray(has_image, bool), np.asarray(folds)
    covered = np.zeros(len(y_log), dtype=bool)
    for k in np.unique(folds):
        held = folds == k
        cal = ConformalCalibration.fit(y_log[~held], log_pred[~held], has_image[~held])
        low, high = cal.interval(log_pred[held], has_image[held], level)
        covered[held] = _covered(y_log[held], low, high)
    return covered


def coverage_table(
    y_log: np.ndarray,
    log_pred: np.ndarray,
    has_image: np.ndarray,
    folds: np.ndarray,
    levels: Sequence[float],
) -> pd.DataFrame:
    """One row per (level, scope): in-sample and cross-fitted coverage (fractions) and the mean
    width of the served (in-sample calibrated) interval in % of the predicted price.

    Scopes: "all" and each has_image group with rows.
    """
    y_log, has_image = np.asarray(y_log, np.float64), np.asarray(has_image, bool)
    cal = ConformalCalibration.fit(y_log, log_pred, has_image)
    price = to_price(log_pred)
    groups = group_names(has_image)
    scopes = {"all": np.ones(len(y_log), dtype=bool)}
    scopes.update({g: groups == g for g in GROUPS if (groups == g).any()})
    rows = []
    for level in levels:
        low, high = cal.interval(log_pred, has_image, level)
        inside = _covered(y_log, low, high)
        honest = cross_fitted_coverage(y_log, log_pred, has_image, folds, level)
        width = 100.0 * (high - low) / price
        for scope, mask in scopes.items():
            rows.append(
                {
                    "nominal": float(level),
                    "scope": scope,
                    "rows": int(mask.sum()),
                    "in_sample": float(inside[mask].mean()),
                    "cross_fitted": float(honest[mask].mean()),
                    "width_pct": float(width[mask].mean()),
                }
            )
    return pd.DataFrame(rows)


def interval_metrics(
    table: pd.DataFrame, levels: Sequence[float] = REPORT_LEVELS
) -> dict[str, float]:
    """`interval_coverage_<L>`, `interval_coverage_cv_<L>`, `interval_width_pct_<L>` (L in %),
    with `_image` / `_text_only` suffixes for the groups, from a `coverage_table`."""
    metrics: dict[str, float] = {}
    for row in table.itertuples(index=False):
        if not any(math.isclose(row.nominal, level) for level in levels):
            continue
        suffix = f"{round(row.nominal * 100)}" + ("" if row.scope == "all" else f"_{row.scope}")
        metrics[f"interval_coverage_{suffix}"] = row.in_sample
        metrics[f"interval_coverage_cv_{suffix}"] = row.cross_fitted
        metrics[f"interval_width_pct_{suffix}"] = row.width_pct
    return metrics


def coverage_curve(table: pd.DataFrame) -> pd.DataFrame:
    """Nominal vs empirical coverage for the plot: `nominal` (the diagonal), `in_sample`,
    `cross_fitted`, and `cross_fitted_<group>` for each group with rows."""
    overall = table[table["scope"] == "all"].set_index("nominal")
    frame = pd.DataFrame(
        {
            "nominal": overall.index.to_numpy(),
            "in_sample": overall["in_sample"].to_numpy(),
            "cross_fitted": overall["cross_fitted"].to_numpy(),
        }
    )
    for group in GROUPS:
        part = table[table["scope"] == group].set_index("nominal")
        if len(part):
            frame[f"cross_fitted_{group}"] = part["cross_fitted"].reindex(frame["nominal"]).values
    return frame
