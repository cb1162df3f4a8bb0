"""Stage `train_gbdt`: tabular + PCA features, every configured booster on the shared folds.

Writes the servable GbdtPredictor to model_dir("gbdt") with OOF and test predictions (log1p,
one column per booster) and logs per-booster SMAPEs, importance and pred-vs-actual plots, the
model directory (artifact path `gbdt_model/`) and each booster's fold-0 model in its MLflow flavor.
"""

from __future__ import annotations

import importlib
import shutil

import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from pricefuse import plots, tracking
from pricefuse.config import Params
from pricefuse.errors import StageError
from pricefuse.features.tabular import Embeddings
from pricefuse.inputs import load_stage_rows, stage_upstream, train_targets
from pricefuse.layout import FOLD, ID, PLOTS_DIR, Layout
from pricefuse.metrics import smape_from_log
from pricefuse.models.gbdt import KFoldResult, booster_class, fit_gbdt

STAGE = "train_gbdt"
MODEL_ARTIFACT = "gbdt_model"


def _load_split(params: Params, split: str) -> tuple[pd.DataFrame, Embeddings]:
    """Parsed rows (+ neighbour features, + stacked member predictions) and embeddings."""
    batch = load_stage_rows(params, split, "gbdt")  # row counts checked there
    return batch.parsed, Embeddings(batch.text, batch.image, batch.image_mask)


def _metrics(kfold: KFoldResult, y: np.ndarray) -> dict[str, float]:
    metrics: dict[str, float] = {"n_features": float(len(kfold.feature_names))}
    for name, score in kfold.oof_smape.items():
        metrics[f"smape_oof_{name}"] = score
        metrics[f"best_iteration_{name}"] = float(np.mean(kfold.best_iterations[name]))
        for k, fold_score in kfold.fold_smape[name].items():
            metrics[f"smape_fold_{k}_{name}"] = fold_score
    # One number for the stage: the equal-weight mean of the boosters (the ensemble fits better).
    metrics["smape_oof"] = smape_from_log(y, np.mean(list(kfold.oof.values()), axis=0))
    return metrics


def _log_plots(kfold: KFoldResult, y: np.ndarray) -> None:
    for name in kfold.oof:
        importance = plots.feature_importance(
            kfold.feature_names,
            kfold.importance[name],
            f"{name} feature importance (gain, fold mean)",
            PLOTS_DIR / f"{STAGE}_{name}_importance.png",
        )
        scatter = plots.pred_vs_actual(
            np.expm1(y),
            np.expm1(kfold.oof[name]),
            f"{name} OOF",
            PLOTS_DIR / f"{STAGE}_{name}_pred_vs_actual.png",
        )
        mlflow.log_artifact(str(importance), "plots")
        mlflow.log_artifact(str(scatter), "plots")


def _log_flavors(kfold: KFoldResult) -> None:
    """Fold 0 of each booster in its own MLflow flavor, for people who want one native model.

    Requirements are given, not inferred: inference imports the model in a subprocess, which
    costs seconds per model for no information we do not already have.
    """
    for name, models in kfold.models.items():
        library = importlib.import_module(name)
        flavor = importlib.import_module(f"mlflow.{name}")
        flavor.log_model(
            models[0].native,
            name=f"{name}_fold0",
            pip_requirements=[f"{name}=={library.__version__}"],
        )


def run(params: Params) -> None:
    cfg = params.gbdt
    layout = Layout(params.data)
    for name in cfg.boosters:
        try:
            booster_class(name)
        except ValueError as exc:
            raise StageError(f"gbdt.boosters: {exc}") from exc
    train, train_emb = _load_split(params, "train")
    test, test_emb = _load_split(params, "test")
    y, folds = train_targets(train)
    out_dir = layout.model_dir("gbdt")
    upstream = stage_upstream(params, "gbdt")

    with tracking.stage_run(STAGE, params, inputs=upstream) as run:
        total = len(cfg.boosters) * len(np.unique(folds))
        with tqdm(total=total, desc="gbdt folds", unit="fit", disable=None) as bar:

            def advance(name: str, fold: int) -> None:
                bar.set_postfix_str(f"{name} fold {fold}")
                bar.update()

            fit = fit_gbdt(
                train, train_emb, y, folds, cfg, params.seed, test, test_emb, on_fold_done=advance
            )

        # Start empty: model files of boosters or folds from an earlier configuration would
        # otherwise sit next to the new ones and be logged with them.
        shutil.rmtree(out_dir, ignore_errors=True)
        fit.predictor.save(out_dir)
        kfold = fit.kfold
        pd.DataFrame({ID: train[ID].to_numpy(), FOLD: folds, **kfold.oof}).to_parquet(
            layout.oof_predictions("gbdt"), index=False
        )
        pd.DataFrame({ID: test[ID].to_numpy(), **kfold.test}).to_parquet(
            layout.test_predictions("gbdt"), index=False
        )
        metrics = _metrics(kfold, y)
        tracking.log_metrics(metrics)
        _log_plots(kfold, y)
        tracking.write_meta(
            out_dir,
            STAGE,
            run.info.run_id,
            boosters=list(kfold.oof),
            n_folds=len(kfold.folds),
            n_features=len(kfold.feature_names),
            smape_oof={name: round(s, 4) for name, s in kfold.oof_smape.items()},
        )
        mlflow.log_artifacts(str(out_dir), MODEL_ARTIFACT)
        _log_flavors(kfold)
        print(
            "OOF SMAPE (%): "
            + ", ".join(f"{name} {score:.3f}" for name, score in kfold.oof_smape.items())
        )
