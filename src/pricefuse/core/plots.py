"""Plots people would rather look at than read: predicted vs actual, learning curves,
feature importance, SMAPE by price decile. Each function writes a PNG and returns its path;
`pricefuse.core.records` writes the same data as CSV for `dvc plots diff`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pricefuse.core.metrics import smape


def pred_vs_actual(actual: np.ndarray, predicted: np.ndarray, title: str, path: Path | str) -> Path:
    """Log-log scatter of predicted vs actual prices with the y=x line and the SMAPE."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(actual, dtype=float)
    f = np.asarray(predicted, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    ax.scatter(a, f, s=6, alpha=0.35, edgecolors="none")
    lo = max(min(a.min(), f.min()), 1e-2)
    hi = max(a.max(), f.max())
    ax.plot([lo, hi], [lo, hi], color="crimson", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("actual price")
    ax.set_ylabel("predicted price")
    ax.set_title(f"{title}  (SMAPE {smape(a, f):.2f}%, n={a.size})")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def learning_curves(
    histories: Mapping[str, Mapping[str, Sequence[float]]], path: Path | str
) -> Path:
    """One line per fold and series (e.g. {"fold_0": {"train_loss": [...], "val_smape": [...]}})."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series = sorted({name for h in histories.values() for name in h})
    fig, axes = plt.subplots(1, max(len(series), 1), figsize=(5 * max(len(series), 1), 4), dpi=110)
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, series, strict=False):
        for fold, history in sorted(histories.items()):
            if name in history:
                ax.plot(range(1, len(history[name]) + 1), history[name], label=fold)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, path: Path | str) -> Path:
    """Horizontal bars in the given order, each labelled with its value."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(labels) + 1.2), dpi=110)
    bars = ax.barh(list(labels), [float(v) for v in values])
    ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    ax.invert_yaxis()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def feature_importance(
    names: Sequence[str], values: Sequence[float], title: str, path: Path | str, top: int = 25
) -> Path:
    """The top features by importance, largest first."""
    order = np.argsort(np.asarray(values, dtype=float))[::-1][:top]
    return bar_chart([names[i] for i in order], [float(values[i]) for i in order], title, path)


def decile_lines(frame: pd.DataFrame, title: str, path: Path | str) -> Path:
    """SMAPE per price decile, one line per model (columns other than decile/price bounds)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    models = [c for c in frame.columns if c not in ("decile", "price_low", "price_high")]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for name in models:
        ax.plot(frame["decile"], frame[name], marker="o", markersize=3, label=name)
    ticks = [f"{d}\n≤{hi:.3g}" for d, hi in zip(frame["decile"], frame["price_high"], strict=True)]
    ax.set_xticks(frame["decile"], ticks, fontsize=7)
    ax.set_xlabel("actual price decile (upper bound)")
    ax.set_ylabel("SMAPE (%)")
    return _save_lines(fig, ax, title, path)


def _save_lines(fig: Any, ax: Any, title: str, path: Path) -> Path:
    """The finish every line chart shares: title, light grid, small legend, written as PNG."""
    ax.set_title(title)
    ax.grid(True, alpha=0.2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def coverage_lines(frame: pd.DataFrame, title: str, path: Path | str) -> Path:
    """Empirical vs nominal interval coverage: one line per column besides `nominal`, and the
    diagonal a calibrated interval lies on (below it: intervals too narrow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--", label="nominal")
    for name in (c for c in frame.columns if c != "nominal"):
        ax.plot(frame["nominal"], frame[name], marker="o", markersize=3, label=name)
    ax.set_xlabel("nominal level")
    ax.set_ylabel("empirical coverage on OOF rows")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return _save_lines(fig, ax, title, path)


def heatmap(frame: pd.DataFrame, title: str, path: Path | str) -> Path:
    """A square table (first column: row labels) as a heatmap with its values written in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = frame.iloc[:, 0].astype(str).tolist()
    values = frame.iloc[:, 1:].to_numpy(dtype=float)
    size = 1.0 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=110)
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(values.shape[1]), frame.columns[1:], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), value in np.ndenumerate(values):
        ax.text(
            j,
            i,
            f"{value:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if value < 0.6 else "black",
        )
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
