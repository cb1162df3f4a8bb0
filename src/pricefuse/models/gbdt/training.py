"""K-fold training of the GBDT member, and the `train_gbdt` stage's work.

Every booster (models.gbdt.boosters) trains on log1p(price), fold k's models on the other folds'
features (features.fold_features) and early-stopping on fold k. Picking one number (the best
iteration) on the fold that is then scored biases OOF SMAPE slightly optimistic; with patience
`early_stopping_rounds` the effect is small and it keeps all training rows for fitting, which
matters more on small data.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pricefuse.core import records
from pricefuse.core.config import GbdtConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, Layout
from pricefuse.core.metrics import smape_from_log
from pricefuse.core.records import FlavorModel, StageRecord
from pricefuse.features.fold_features import FoldFeatures, fold_features
from pricefuse.features.tabular import Embeddings
from pricefuse.models.gbdt.boosters import Booster, FitOptions, available_cores, booster_class
from pricefuse.models.gbdt.predictor import GbdtPredictor
from pricefuse.pipeline.inputs import train_targets
from pricefuse.pipeline.members import MemberBatch
from pricefuse.pipeline.predictions import write_member_predictions

PRODUCER = "gbdt"
IMPORTANCE_TOP = 25


def clip_range(y: np.ndarray) -> tuple[float, float]:
    """The log1p range predictions are clipped to: that of the training targets.

    Why: trees cannot extrapolate meaningfully, so anything outside the seen range is an artefact
    of summing many trees; clipping also keeps `expm1` positive and finite downstream.
    """
    y = np.asarray(y, dtype=np.float64)
    return float(max(y.min(), 0.0)), float(y.max())


@dataclass
class KFoldResult:
    """Everything the fold loop produced, per booster name."""

    feature_names: tuple[str, ...]
    folds: tuple[int, ...]
    clip: tuple[float, float]
    oof: dict[str, np.ndarray] = field(default_factory=dict)
    test: dict[str, np.ndarray] = field(default_factory=dict)
    fold_smape: dict[str, dict[int, float]] = field(default_factory=dict)
    oof_smape: dict[str, float] = field(default_factory=dict)
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    best_iterations: dict[str, list[int]] = field(default_factory=dict)
    models: dict[str, list[Booster]] = field(default_factory=dict)
    offsets: list[float] = field(default_factory=list)


def train_kfold_boosters(
    fold_sets: Sequence[FoldFeatures],
    y: np.ndarray,
    cfg: GbdtConfig,
    seed: int,
    n_jobs: int | None = None,
    on_fold_done: Callable[[str, int], None] | None = None,
) -> KFoldResult:
    """Train every booster in `cfg.boosters` on the given folds.

    Each fold model trains on its fold's `x_fit` and early-stops on `x_held`; its predictions on
    the held rows form the OOF column, and the test prediction is the mean over fold models.
    Targets are centred on the fold's training median (added back to predictions): with a
    bounded-gradient loss such as Huber, trees that start from 0 would spend hundreds of rounds
    just reaching the price level (XGBoost's pseudo-Huber never got there in 600).
    Importances are averaged over folds. `on_fold_done(booster, fold)` reports progress.
    """
    y = np.asarray(y, dtype=np.float64)
    if not fold_sets:
        raise ValueError("no folds to train on")
    if not np.isfinite(y).all():
        raise ValueError("targets contain NaN or infinite values")
    covered = np.sum([f.held for f in fold_sets], axis=0)
    if len(fold_sets) < 2 or len(covered) != len(y) or not (covered == 1).all():
        raise ValueError("need >= 2 folds and every train row in exactly one")
    options = FitOptions(cfg, seed, n_jobs or available_cores())
    lo, hi = clip_range(y)
    names = fold_sets[0].x_fit.names
    with_test = all(f.x_test is not None for f in fold_sets)
    result = KFoldResult(tuple(names), tuple(f.fold for f in fold_sets), (lo, hi))
    result.offsets = [float(np.median(y[~part.held])) for part in fold_sets]
    for name in cfg.boosters:
        cls = booster_class(name)
        oof = np.zeros(len(y))
        test_sum = None
        models: list[Booster] = []
        for part, offset in zip(fold_sets, result.offsets, strict=True):
            held = part.held
            model = cls().fit(part.x_fit, y[~held] - offset, part.x_held, y[held] - offset, options)
            oof[held] = np.clip(model.predict(part.x_held) + offset, lo, hi)
            if with_test and part.x_test is not None:
                pred = np.clip(model.predict(part.x_test) + offset, lo, hi)
                test_sum = pred if test_sum is None else test_sum + pred
            result.fold_smape.setdefault(name, {})[part.fold] = smape_from_log(y[held], oof[held])
            models.append(model)
            if on_fold_done is not None:
                on_fold_done(name, part.fold)
        result.oof[name] = oof
        result.oof_smape[name] = smape_from_log(y, oof)
        if test_sum is not None:
            result.test[name] = test_sum / len(fold_sets)
        result.importance[name] = np.mean([m.feature_importance() for m in models], axis=0)
        result.best_iterations[name] = [m.best_iteration for m in models]
        result.models[name] = models
    return result


@dataclass
class GbdtFit:
    """The result of `fit_gbdt`: the servable predictor and the fold-loop details."""

    predictor: GbdtPredictor
    kfold: KFoldResult


def fit_gbdt(
    train: pd.DataFrame,
    train_emb: Embeddings,
    y: np.ndarray,
    folds: np.ndarray,
    cfg: GbdtConfig,
    seed: int,
    test: pd.DataFrame | None = None,
    test_emb: Embeddings | None = None,
    n_jobs: int | None = None,
    on_fold_done: Callable[[str, int], None] | None = None,
) -> GbdtFit:
    """Per fold: fit the featurizer on the other folds, then every booster (see FoldFeatures)."""
    fold_sets = fold_features(train, train_emb, folds, cfg, seed, test, test_emb)
    kfold = train_kfold_boosters(fold_sets, y, cfg, seed, n_jobs, on_fold_done)
    featurizers = [f.featurizer for f in fold_sets]
    predictor = GbdtPredictor(featurizers, kfold.models, kfold.clip, kfold.offsets)
    return GbdtFit(predictor, kfold)


def _embeddings(batch: MemberBatch) -> Embeddings:
    return Embeddings(batch.text, batch.image, batch.image_mask)


def kfold_metrics(kfold: KFoldResult, y: np.ndarray) -> dict[str, float]:
    """Per booster: OOF and per-fold SMAPE, mean best iteration; `smape_oof` for the stage."""
    metrics: dict[str, float] = {"n_features": float(len(kfold.feature_names))}
    for name, score in kfold.oof_smape.items():
        metrics[f"smape_oof_{name}"] = score
        metrics[f"best_iteration_{name}"] = float(np.mean(kfold.best_iterations[name]))
        for k, fold_score in kfold.fold_smape[name].items():
            metrics[f"smape_fold_{k}_{name}"] = fold_score
    # One number for the stage: the equal-weight mean of the boosters (the ensemble fits better).
    metrics["smape_oof"] = smape_from_log(y, np.mean(list(kfold.oof.values()), axis=0))
    return metrics


def kfold_plots(kfold: KFoldResult, y: np.ndarray) -> list[records.PlotData]:
    """Per booster pred-vs-actual and top features by fold-mean gain; SMAPE by price decile with
    one column per booster (the names dvc.yaml declares under plots/train_gbdt/)."""
    out = [
        records.pred_vs_actual(f"pred_vs_actual_{b}", y, p, f"{b} OOF")
        for b, p in kfold.oof.items()
    ]
    out.append(records.decile_plot("smape_by_decile", y, kfold.oof, "gbdt OOF"))
    for name, gains in kfold.importance.items():
        top = np.argsort(np.asarray(gains, dtype=np.float64))[::-1][:IMPORTANCE_TOP]
        out.append(
            records.bars(
                f"importance_{name}",
                [kfold.feature_names[i] for i in top],
                [float(gains[i]) for i in top],
                f"{name} feature importance (gain, fold mean)",
            )
        )
    return out


def _version(library: str) -> str:
    # The module's own version: some distributions are named otherwise (e.g. xgboost-cpu).
    return str(importlib.import_module(library).__version__)


def flavor_models(kfold: KFoldResult) -> dict[str, FlavorModel]:
    """Fold 0 of each booster for its own MLflow flavor, for people who want one native model.
    Requirements are given, not inferred: inferring imports the model in a subprocess, which
    costs seconds per model for no information we do not already have."""
    return {
        f"{name}_fold0": FlavorModel(
            f"mlflow.{name}", models[0].native, [f"{name}=={_version(name)}"]
        )
        for name, models in kfold.models.items()
    }


def train_gbdt_members(
    cfg: GbdtConfig, seed: int, train: MemberBatch, test: MemberBatch, layout: Layout
) -> StageRecord:
    """The `train_gbdt` stage's work: every booster on the shared folds, the predictor saved to
    its (emptied) model directory, OOF and test predictions written (log1p, one column per
    booster); returns what the stage records."""
    from tqdm import tqdm

    for name in cfg.boosters:
        try:
            booster_class(name)
        except ValueError as exc:
            raise StageError(f"gbdt.boosters: {exc}") from exc
    y, folds = train_targets(train.parsed)
    total = len(cfg.boosters) * len(np.unique(folds))
    with tqdm(total=total, desc="gbdt folds", unit="fit", disable=None) as bar:

        def advance(name: str, fold: int) -> None:
            bar.set_postfix_str(f"{name} fold {fold}")
            bar.update()

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
