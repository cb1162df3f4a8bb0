"""The `train_gbdt` stage's work: every configured member (each booster of `gbdt.boosters`,
`<booster>_unit` per `gbdt.unit_price_boosters`, `<booster>_own` per `gbdt.own_view_boosters`)
on the shared folds, the servable GbdtPredictor saved, OOF and test predictions written, and
what the stage records (per-member SMAPE, importance and decile plots, each member's fold-0 model
in its booster's MLflow flavor)."""

from __future__ import annotations

import importlib
import shutil

import numpy as np

from pricefuse.core import records
from pricefuse.core.config import GbdtConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, Layout
from pricefuse.core.metrics import smape_from_log
from pricefuse.core.records import FlavorModel, StageRecord
from pricefuse.features.tabular import Embeddings
from pricefuse.models.gbdt.boosters import booster_class, member_kind
from pricefuse.models.gbdt.training import KFoldResult, fit_gbdt
from pricefuse.pipeline.inputs import train_targets
from pricefuse.pipeline.members import MemberBatch
from pricefuse.pipeline.predictions import write_member_predictions

PRODUCER = "gbdt"
IMPORTANCE_TOP = 25


def _embeddings(batch: MemberBatch) -> Embeddings:
    return Embeddings(batch.text, batch.image, batch.image_mask, batch.llm)


def kfold_metrics(kfold: KFoldResult, y: np.ndarray) -> dict[str, float]:
    """Per member: OOF and per-fold SMAPE, mean best iteration; `smape_oof` for the stage."""
    metrics: dict[str, float] = {"n_features": float(len(kfold.feature_names))}
    for name, score in kfold.oof_smape.items():
        metrics[f"smape_oof_{name}"] = score
        metrics[f"best_iteration_{name}"] = float(np.mean(kfold.best_iterations[name]))
        for k, fold_score in kfold.fold_smape[name].items():
            metrics[f"smape_fold_{k}_{name}"] = fold_score
    # One number for the stage: the equal-weight mean of the members (the ensemble fits better).
    metrics["smape_oof"] = smape_from_log(y, np.mean(list(kfold.oof.values()), axis=0))
    return metrics


def kfold_plots(kfold: KFoldResult, y: np.ndarray) -> list[records.PlotData]:
    """Per member pred-vs-actual and top features by fold-mean gain (named by the columns that
    member reads: an own-view member's subset); SMAPE by price decile with one column per member
    (the names dvc.yaml declares under plots/train_gbdt/)."""
    out = [
        records.pred_vs_actual(f"pred_vs_actual_{b}", y, p, f"{b} OOF")
        for b, p in kfold.oof.items()
    ]
    out.append(records.decile_plot("smape_by_decile", y, kfold.oof, "gbdt OOF"))
    for name, gains in kfold.importance.items():
        top = np.argsort(np.asarray(gains, dtype=np.float64))[::-1][:IMPORTANCE_TOP]
        names = kfold.features_of(name)
        out.append(
            records.bars(
                f"importance_{name}",
                [names[i] for i in top],
                [float(gains[i]) for i in top],
                f"{name} feature importance (gain, fold mean)",
            )
        )
    return out


def _version(library: str) -> str:
    # The module's own version: some distributions are named otherwise (e.g. xgboost-cpu).
    return str(importlib.import_module(library).__version__)


def flavor_models(kfold: KFoldResult) -> dict[str, FlavorModel]:
    """Fold 0 of each member in its booster's MLflow flavor (`lightgbm_unit_fold0`: a LightGBM
    model of log price per unit), for people who want one native model. Requirements are given,
    not inferred: inferring imports the model in a subprocess, which costs seconds per model for
    no information we do not already have."""
    out = {}
    for name, models in kfold.models.items():
        kind = member_kind(name).booster
        out[f"{name}_fold0"] = FlavorModel(
            f"mlflow.{kind}", models[0].native, [f"{kind}=={_version(kind)}"]
        )
    return out


def train_gbdt_members(
    cfg: GbdtConfig, seed: int, train: MemberBatch, test: MemberBatch, layout: Layout
) -> StageRecord:
    """The `train_gbdt` stage's work: every member on the shared folds, the predictor saved to
    its (emptied) model directory, OOF and test predictions written (log1p, one column per
    member); returns what the stage records."""
    from tqdm import tqdm

    for name in cfg.boosters:
        try:
            booster_class(name)
        except ValueError as exc:
            raise StageError(f"gbdt.boosters: {exc}") from exc
    y, folds = train_targets(train.parsed)
    # Each member predicts every train row once (fold k's held rows from fold k's model): the
    # bar counts those rows, so it reads rows/s with an ETA over members x folds.
    total = len(cfg.members) * len(y)
    with tqdm(total=total, desc="gbdt", unit="row", disable=None) as bar:

        def advance(name: str, fold: int) -> None:
            bar.set_postfix_str(f"{name} fold {fold} done", refresh=False)
            bar.update(int(np.sum(folds == fold)))

        fit = fit_gbdt(
            train.parsed,
            _embeddings(train),
            y,
            folds,
            cfg,
            seed,
            test.parsed,
            _embeddings(test),
            on_fold_done=advance,
        )
    # Start empty: model files of boosters or folds from an earlier configuration would
    # otherwise sit next to the new ones and be logged with them.
    out_dir = layout.model_dir(PRODUCER)
    shutil.rmtree(out_dir, ignore_errors=True)
    fit.predictor.save(out_dir)
    kfold = fit.kfold
    write_member_predictions(
        layout, PRODUCER, train.parsed[ID], folds, kfold.oof, test.parsed[ID], kfold.test
    )
    scores = ", ".join(f"{name} {score:.3f}" for name, score in kfold.oof_smape.items())
    return StageRecord(
        summary=f"OOF SMAPE (%): {scores}",
        metrics=kfold_metrics(kfold, y),
        plots=kfold_plots(kfold, y),
        artifacts={"gbdt_model": [out_dir]},
        meta={
            out_dir: {
                "boosters": list(kfold.oof),
                "n_folds": len(kfold.folds),
                "n_features": len(kfold.feature_names),
                "smape_oof": {name: round(s, 4) for name, s in kfold.oof_smape.items()},
            }
        },
        models=flavor_models(kfold),
    )
