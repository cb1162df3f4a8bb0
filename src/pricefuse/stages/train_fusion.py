"""Stage `train_fusion`: K-fold training of the gated fusion head on the parsed tables and
embeddings; writes the fold models, OOF and test predictions, and logs the run.

The model is logged as the predictor directory (`predictor.json` + `fold_k.pt`) under the
artifact path `fusion_model/`, not as an `mlflow.pytorch` model of one fold: the fold-averaged
predictor is what the ensemble and serving use, and `FusionPredictor.load` on the downloaded
directory rebuilds exactly that.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric

from pricefuse import plots, tracking
from pricefuse.config import Params
from pricefuse.errors import StageError
from pricefuse.inputs import load_stage_rows, stage_upstream
from pricefuse.layout import FOLD, ID, PLOTS_DIR, Layout
from pricefuse.models.train import (
    MANIFEST,
    FoldHistory,
    FusionPredictor,
    KFoldResult,
    SplitData,
    train_kfold,
)

STAGE = "train_fusion"
MEMBER = "fusion"
MODEL_ARTIFACT_PATH = "fusion_model"
# MLflow accepts at most 1000 metric values per log_batch call.
METRIC_BATCH = 1000


def load_split(params: Params, split: str) -> SplitData:
    """The fusion head's rows: parsed table (+ neighbour features, + stacked members) and its
    embeddings, checked (pricefuse.inputs)."""
    batch = load_stage_rows(params, split, MEMBER)
    try:
        return SplitData(batch.parsed, batch.text, batch.image, batch.image_mask)
    except ValueError as exc:
        raise StageError(f"{split} inputs: {exc}") from exc


def log_curves(run_id: str, histories: dict[str, FoldHistory]) -> None:
    """Per-epoch train loss and validation SMAPE of every fold, as MLflow metrics with steps."""
    now = int(time.time() * 1000)
    values = [
        Metric(f"{series}_{fold}", float(value), now, step)
        for fold, history in histories.items()
        for series, curve in history.as_series().items()
        for step, value in enumerate(curve, start=1)
    ]
    client = mlflow.MlflowClient()
    for start in range(0, len(values), METRIC_BATCH):
        client.log_batch(run_id, metrics=values[start : start + METRIC_BATCH])


def write_outputs(
    out_dir: Path, layout: Layout, train: SplitData, test: SplitData, result: KFoldResult
) -> list[Path]:
    """Predictor files and prediction tables; returns the predictor files (to log as the model).

    Test predictions come from the predictor reloaded from disk, i.e. exactly as the ensemble and
    the served model will compute them.
    """
    for stale in out_dir.glob("fold_*.pt"):
        stale.unlink()
    manifest = result.predictor.save(out_dir)
    pd.DataFrame({ID: train.frame[ID], FOLD: result.folds, MEMBER: result.oof}).to_parquet(
        layout.oof_predictions(MEMBER), index=False
    )
    saved = FusionPredictor.load(out_dir)
    test_pred = saved.predict(test.frame, test.text, test.image, test.image_mask)
    pd.DataFrame({ID: test.frame[ID], MEMBER: test_pred}).to_parquet(
        layout.test_predictions(MEMBER), index=False
    )
    return [manifest, *sorted(out_dir.glob("fold_*.pt"))]


def run(params: Params) -> None:
    layout = Layout(params.data)
    train = load_split(params, "train")
    test = load_split(params, "test")
    out_dir = layout.model_dir(MEMBER)
    upstream = stage_upstream(params, MEMBER)
    with tracking.stage_run(STAGE, params, inputs=upstream) as run:
        try:
            result = train_kfold(train, params.fusion, params.seed, progress=True)
        except ValueError as exc:
            raise StageError(str(exc)) from exc
        model_files = write_outputs(out_dir, layout, train, test, result)

        metrics = {"smape_oof": result.smape_oof, "train_seconds": result.seconds}
        for k, (name, history) in enumerate(result.histories.items()):
            metrics[f"smape_fold_{k}"] = result.fold_smape[k]
            metrics[f"best_epoch_{name}"] = history.best_epoch
        tracking.log_metrics(metrics)
        log_curves(run.info.run_id, result.histories)

        curves = {name: h.as_series() for name, h in result.histories.items()}
        actual = np.expm1(train.target)
        for path in (
            plots.learning_curves(curves, PLOTS_DIR / "train_fusion_learning_curves.png"),
            plots.pred_vs_actual(
                actual,
                np.expm1(result.oof),
                "fusion OOF",
                PLOTS_DIR / "train_fusion_pred_vs_actual.png",
            ),
        ):
            mlflow.log_artifact(str(path), "plots")
        for path in model_files:
            mlflow.log_artifact(str(path), MODEL_ARTIFACT_PATH)
        tracking.write_meta(
            out_dir,
            STAGE,
            run.info.run_id,
            smape_oof=result.smape_oof,
            fold_smape=result.fold_smape,
            model_artifact_path=MODEL_ARTIFACT_PATH,
            manifest=MANIFEST,
        )
        folds = ", ".join(f"{s:.2f}" for s in result.fold_smape)
        print(f"fusion OOF SMAPE {result.smape_oof:.3f}% (folds {folds}) in {result.seconds:.0f}s")
