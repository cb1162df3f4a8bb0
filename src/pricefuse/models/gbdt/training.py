"""K-fold training of the GBDT member (the stage core is models.gbdt.member).

Every booster (models.gbdt.boosters) trains on log1p(price), fold k's models on the other folds'
features (features.fold_features) and early-stopping on fold k. Picking one number (the best
iteration) on the fold that is then scored biases OOF SMAPE slightly optimistic; with patience
`early_stopping_rounds` the effect is small and it keeps all training rows for fitting, which
matters more on small data.

A per-unit member (`<booster>_unit`, `gbdt.unit_price_boosters`) is the same booster trained on
log1p(price) - log1p(quantity), the log price per canonical unit (quantity from the features'
`log_quantity`, 0 where unknown), with log1p(quantity) added back to its predictions: its trees
model the price per gram / millilitre / count, and pack size enters exactly rather than through
splits.

An own-view member (`<booster>_own`, `gbdt.own_view_boosters`) is the same booster trained on
log1p price from the features less every stacked `member_*` and neighbour `nbr_*` column
(boosters.member_view): the members reading those columns err alike, and one that cannot read
them errs differently, which the ensemble gains from even though it is weaker alone.
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
from pricefuse.features.tabular import Embeddings, FeatureMatrix
from pricefuse.models.gbdt.boosters import (
    Booster,
    FitOptions,
    MemberKind,
    available_cores,
    booster_class,
    member_kind,
    member_prediction,
    member_view,
    unit_base,
    view_columns,
)
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
    """Everything the fold loop produced, per member name (GbdtConfig.members).

    `feature_names`: the fold matrices' columns; a member that reads a subset of them (an
    own-view member) has its own in `member_features`, in the order of its `importance`
    (`features_of`)."""

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
    # per member, each fold's target offset (the fold's training median of the target)
    offsets: dict[str, list[float]] = field(default_factory=dict)
    # per member reading a subset of `feature_names`, those names (its models' columns)
    member_features: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def features_of(self, member: str) -> tuple[str, ...]:
        """The names of the columns member `member`'s models read (its `importance` order)."""
        return self.member_features.get(member, self.feature_names)


def train_kfold_boosters(
    fold_sets: Sequence[FoldFeatures],
    y: np.ndarray,
    cfg: GbdtConfig,
    seed: int,
    n_jobs: int | None = None,
    on_fold_done: Callable[[str, int], None] | None = None,
) -> KFoldResult:
    """Train every member of `cfg.members` on the given folds: each booster of `cfg.boosters`
    on log1p price, each of `cfg.unit_price_boosters` (member `<booster>_unit`) on log1p
    price less the row's log1p quantity (`unit_base`), added back to its predictions, and each
    of `cfg.own_view_boosters` (member `<booster>_own`) on log1p price from the features less
    the `member_*` / `nbr_*` columns (`member_view`).

    Each fold model trains on its fold's `x_fit` and early-stops on `x_held`; its predictions on
    the held rows form the OOF column, and the test prediction is the mean over fold models.
    Targets are centred on the fold's training median (`offsets`, added back to predictions,
    which are clipped to the log1p price range of `y` for every member): with a
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
    for name in cfg.members:
        kind = member_kind(name)
        cls = booster_class(kind.booster)
        columns = view_columns(names, kind.own_view)
        if columns is not None:
            result.member_features[name] = tuple(names[i] for i in columns)
        oof = np.zeros(len(y))
        test_sum = None
        models: list[Booster] = []
        offsets: list[float] = []
        for part in fold_sets:
            held = part.held
            # the target: log1p price, less log1p quantity for a per-unit member
            t_fit = y[~held] - unit_base(part.x_fit, kind.per_unit)
            t_held = y[held] - unit_base(part.x_held, kind.per_unit)
            offset = float(np.median(t_fit))
            model = cls().fit(
                member_view(part.x_fit, kind),
                t_fit - offset,
                member_view(part.x_held, kind),
                t_held - offset,
                options,
            )
            oof[held] = _predict(model, part.x_held, offset, kind, result.clip)
            if with_test and part.x_test is not None:
                pred = _predict(model, part.x_test, offset, kind, result.clip)
                test_sum = pred if test_sum is None else test_sum + pred
            result.fold_smape.setdefault(name, {})[part.fold] = smape_from_log(y[held], oof[held])
            models.append(model)
            offsets.append(offset)
            if on_fold_done is not None:
                on_fold_done(name, part.fold)
        result.oof[name] = oof
        result.oof_smape[name] = smape_from_log(y, oof)
        if test_sum is not None:
            result.test[name] = test_sum / len(fold_sets)
        result.importance[name] = np.mean([m.feature_importance() for m in models], axis=0)
        result.best_iterations[name] = [m.best_iteration for m in models]
        result.models[name] = models
        result.offsets[name] = offsets
    return result


def _predict(
    model: Booster, x: FeatureMatrix, offset: float, kind: MemberKind, clip: tuple[float, float]
) -> np.ndarray:
    raw = model.predict(member_view(x, kind))
    return member_prediction(raw, offset, unit_base(x, kind.per_unit), clip)


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
