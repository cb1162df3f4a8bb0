"""K-fold training of the GBDT member (the stage core is models.gbdt.member).

Every booster (models.gbdt.boosters) trains on log1p(price), fold k's models on the other folds'
features (features.fold_features) and early-stopping on fold k. Picking one number (the best
iteration) on the fold that is then scored biases OOF SMAPE slightly optimistic; with patience
`early_stopping_rounds` the effect is small and it keeps all training rows for fitting, which
matters more on small data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pricefuse.core.config import GbdtConfig
from pricefuse.core.device import resolve_device
from pricefuse.core.metrics import smape_from_log
from pricefuse.features.fold_features import FoldFeatures, fold_features
from pricefuse.features.tabular import Embeddings
from pricefuse.models.gbdt.boosters import Booster, FitOptions, available_cores, booster_class
from pricefuse.models.gbdt.predictor import GbdtPredictor


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
    XGBoost and CatBoost train on `gbdt.device` (LightGBM on the CPU: models.gbdt.boosters).
    """
    y = np.asarray(y, dtype=np.float64)
    if not fold_sets:
        raise ValueError("no folds to train on")
    if not np.isfinite(y).all():
        raise ValueError("targets contain NaN or infinite values")
    covered = np.sum([f.held for f in fold_sets], axis=0)
    if len(fold_sets) < 2 or len(covered) != len(y) or not (covered == 1).all():
        raise ValueError("need >= 2 folds and every train row in exactly one")
    device = resolve_device(cfg.device, "gbdt.device")
    options = FitOptions(cfg, seed, n_jobs or available_cores(), device)
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
