"""What a stage records, as data: the value a stage's library core returns.

Why a value and not MLflow calls sprinkled through the core: the core stays testable without a
tracking server (a test inspects the record), every stage records the same way
(`tracking.record`), and the plot data that DVC diffs and the PNG people look at come from one
table, so they cannot disagree.

Plot data is written to `plots/<stage>/<name>.csv` (declared in dvc.yaml with a template, so
`dvc plots diff` overlays two experiments) next to a PNG of the same data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from pricefuse.core import plots
from pricefuse.core.layout import PLOTS_DIR
from pricefuse.core.metrics import smape

PlotKind = Literal["scatter", "curves", "bars", "deciles", "coverage", "heatmap"]
# Scatter data for DVC is a fixed, seeded sample: two experiments on the same rows then show
# the same points, and the file stays small on 75k rows. The PNG draws every row.
SCATTER_SAMPLE = 2000


@dataclass(frozen=True)
class PlotData:
    """One plot: the table DVC renders (`frame`) and how to draw it as a PNG (`kind`)."""

    name: str
    kind: PlotKind
    frame: pd.DataFrame
    title: str

    def write(self, stage_dir: Path) -> list[Path]:
        """Write `<name>.csv` (the diffable data) and `<name>.png`; return both paths."""
        stage_dir.mkdir(parents=True, exist_ok=True)
        csv_path = stage_dir / f"{self.name}.csv"
        png_path = stage_dir / f"{self.name}.png"
        data = self.frame
        if self.kind == "scatter" and len(data) > SCATTER_SAMPLE:
            data = data.sample(SCATTER_SAMPLE, random_state=0).sort_index()
        data.to_csv(csv_path, index=False, float_format="%.6g")
        _draw(self, png_path)
        return [csv_path, png_path]


def _draw(plot: PlotData, path: Path) -> None:
    frame = plot.frame
    if plot.kind == "scatter":
        plots.pred_vs_actual(frame["actual"], frame["predicted"], plot.title, path)
    elif plot.kind == "curves":
        series = {c: frame[c].dropna().tolist() for c in frame.columns if c != "epoch"}
        plots.learning_curves({"mean over folds": series}, path)
    elif plot.kind == "deciles":
        plots.decile_lines(frame, plot.title, path)
    elif plot.kind == "coverage":
        plots.coverage_lines(frame, plot.title, path)
    elif plot.kind == "heatmap":
        plots.heatmap(frame, plot.title, path)
    else:
        plots.bar_chart(frame["label"].tolist(), frame["value"].tolist(), plot.title, path)


class FlavorModel(NamedTuple):
    """A native model to log in its MLflow flavor: `flavor` is the module (e.g. "mlflow.lightgbm"),
    requirements are given so MLflow need not infer them (a subprocess per model)."""

    flavor: str
    model: Any
    pip_requirements: list[str]


@dataclass
class StageRecord:
    """Everything a stage run records.

    - metrics: final values; step_metrics: per-step series (learning curves), logged with steps;
    - plots: tables written under plots/<stage>/ and logged as artifacts;
    - artifacts: MLflow artifact path -> file or directory to upload;
    - meta: output directory -> facts for its meta.json (the run id is added by `record`);
    - tables: logged with mlflow.log_table; tags: run tags; summary: printed at the end;
    - models: name -> native model logged as `<flavor>.log_model(model, name=name, ...)`;
    - params: run parameters the stage learns while working (e.g. an encoder's dimension);
    - texts: MLflow artifact path -> small text written by no stage output (mlflow.log_text).
    """

    summary: str
    metrics: dict[str, float] = field(default_factory=dict)
    step_metrics: dict[str, Sequence[float]] = field(default_factory=dict)
    plots: list[PlotData] = field(default_factory=list)
    artifacts: dict[str, list[Path]] = field(default_factory=dict)
    meta: dict[Path, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    models: dict[str, FlavorModel] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    def write_plots(self, stage: str, root: Path = PLOTS_DIR) -> list[Path]:
        """Write every plot under `root/<stage>/`, removing plots of an earlier configuration
        (e.g. a booster no longer trained) so DVC does not show stale files."""
        stage_dir = root / stage
        if stage_dir.is_dir():
            for stale in stage_dir.glob("*.csv"):
                stale.unlink()
            for stale in stage_dir.glob("*.png"):
                stale.unlink()
        stage_dir.mkdir(parents=True, exist_ok=True)  # a DVC output, even when a run plots nothing
        return [path for plot in self.plots for path in plot.write(stage_dir)]


def pred_vs_actual(name: str, y_log: np.ndarray, pred_log: np.ndarray, title: str) -> PlotData:
    """Predicted vs actual prices (prices, not logs: what people read)."""
    frame = pd.DataFrame(
        {"actual": np.expm1(np.asarray(y_log)), "predicted": np.expm1(np.asarray(pred_log))}
    )
    return PlotData(name, "scatter", frame, title)


def smape_by_decile(y_log: np.ndarray, predictions_log: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """SMAPE (%) of each prediction per decile of the actual price: where a model fails (cheap
    items, luxury items) is invisible in one OOF number."""
    actual = np.expm1(np.asarray(y_log, dtype=np.float64))
    deciles = pd.qcut(actual, q=10, labels=False, duplicates="drop")
    rows = []
    for decile in np.unique(deciles):
        held = deciles == decile
        row: dict[str, float] = {
            "decile": int(decile) + 1,
            "price_low": float(actual[held].min()),
            "price_high": float(actual[held].max()),
        }
        for name, pred in predictions_log.items():
            row[name] = smape(actual[held], np.expm1(np.asarray(pred)[held]))
        rows.append(row)
    return pd.DataFrame(rows)


def decile_plot(
    name: str, y_log: np.ndarray, predictions_log: Mapping[str, np.ndarray], title: str
) -> PlotData:
    return PlotData(name, "deciles", smape_by_decile(y_log, predictions_log), title)


def mean_curves(histories: Mapping[str, Mapping[str, Sequence[float]]]) -> pd.DataFrame:
    """Per-epoch mean over folds of each series (`epoch`, `<series>`...): one line per series
    that two experiments can be overlaid on. A fold that stopped early leaves the mean at the
    epochs it did not reach."""
    names = sorted({series for history in histories.values() for series in history})
    epochs = max((len(c) for h in histories.values() for c in h.values()), default=0)
    frame = pd.DataFrame({"epoch": np.arange(1, epochs + 1)})
    for series in names:
        values = np.full((len(histories), epochs), np.nan)
        for i, history in enumerate(histories.values()):
            curve = list(history.get(series, ()))
            values[i, : len(curve)] = curve
        with np.errstate(invalid="ignore"):
            frame[series] = np.nanmean(values, axis=0)
    return frame


def bars(name: str, labels: Sequence[str], values: Sequence[float], title: str) -> PlotData:
    frame = pd.DataFrame({"label": list(labels), "value": [float(v) for v in values]})
    return PlotData(name, "bars", frame, title)


def member_plots(
    member: str,
    y_log: np.ndarray,
    oof_log: np.ndarray,
    fold_curves: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> list[PlotData]:
    """The plots every member stage declares in dvc.yaml: `pred_vs_actual`, `smape_by_decile`
    and, for members trained by epochs, `learning_curves` (the mean over folds)."""
    title = f"{member} OOF"
    plots = [
        pred_vs_actual("pred_vs_actual", y_log, oof_log, title),
        decile_plot("smape_by_decile", y_log, {member: oof_log}, title),
    ]
    if fold_curves is not None:
        curves = mean_curves(fold_curves)
        plots.append(PlotData("learning_curves", "curves", curves, f"{title}, mean over folds"))
    return plots
