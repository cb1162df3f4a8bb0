"""Stage `train_linear`: the n-gram member (TF-IDF word + char n-grams -> Ridge), K folds for OOF
predictions and one full fit for test and serving (pricefuse.models.linear)."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from pricefuse import plots, tracking
from pricefuse.config import Params
from pricefuse.errors import StageError
from pricefuse.features.ngrams import VIEWS
from pricefuse.inputs import train_targets
from pricefuse.layout import FOLD, ID, PLOTS_DIR, Layout
from pricefuse.models.linear import MEMBER, LinearPredictor, fit_linear

STAGE = "train_linear"


def _parsed(layout: Layout, split: str) -> pd.DataFrame:
    path = layout.parsed(split)
    if not path.exists():
        raise StageError(f"{path} not found: run preprocess first")
    return pd.read_parquet(path)


def run(params: Params) -> None:
    cfg = params.linear
    if cfg.view not in VIEWS:
        raise StageError(f"linear.view must be one of {', '.join(VIEWS)}, got {cfg.view!r}")
    layout = Layout(params.data)
    train, test = _parsed(layout, "train"), _parsed(layout, "test")
    y, folds = train_targets(train)
    out_dir = layout.model_dir(MEMBER)
    data_files = [params.data.train_csv, params.data.test_csv]
    with tracking.stage_run(
        STAGE, params, upstream=[layout.interim_dir], data_files=data_files
    ) as run:
        with tqdm(total=len(np.unique(folds)), desc="linear folds", disable=None) as bar:
            fit = fit_linear(cfg, train, y, folds, on_fold_done=lambda k: bar.update())
        shutil.rmtree(out_dir, ignore_errors=True)
        fit.predictor.save(out_dir)
        saved = LinearPredictor.load(out_dir)
        pd.DataFrame({ID: train[ID], FOLD: folds, MEMBER: fit.oof}).to_parquet(
            layout.oof_predictions(MEMBER), index=False
        )
        pd.DataFrame({ID: test[ID], MEMBER: saved.predict(test)}).to_parquet(
            layout.test_predictions(MEMBER), index=False
        )
        metrics = {"smape_oof": fit.smape_oof, "n_features": float(len(saved.coef))}
        metrics.update({f"smape_fold_{k}": s for k, s in fit.fold_smape.items()})
        tracking.log_metrics(metrics)
        scatter = plots.pred_vs_actual(
            np.expm1(y),
            np.expm1(fit.oof),
            "linear OOF",
            PLOTS_DIR / "train_linear_pred_vs_actual.png",
        )
        mlflow.log_artifact(str(scatter), "plots")
        mlflow.log_artifacts(str(out_dir), "linear_model")
        tracking.write_meta(out_dir, STAGE, run.info.run_id, smape_oof=fit.smape_oof)
        print(f"linear OOF SMAPE {fit.smape_oof:.3f}% ({len(saved.coef)} n-gram features)")
