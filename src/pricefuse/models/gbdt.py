"""Gradient-boosted trees (LightGBM, XGBoost, CatBoost) behind one small interface.

Why three boosters: they split categoricals, missing values and leaves differently, so their
errors are only partly correlated and the ensemble gains from each. Why one interface: the
fold loop, the saved layout and the serving path are written once and cannot drift per booster.

Every booster trains on log1p(price) and early-stops on the held-out fold of the fold loop. The
loss is `gbdt.objective`: squared error, or Huber with `huber_delta` (default). Why Huber: SMAPE
is close to the absolute error of log prices, so mispriced listings should pull the trees less
than squared error lets them.
Picking one number (the best iteration) on the fold that is then scored biases
OOF SMAPE slightly optimistic; with patience `early_stopping_rounds` the effect is small and it
keeps all training rows for fitting, which matters more on small data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import numpy as np
import pandas as pd

from pricefuse import compat
from pricefuse.config import GbdtConfig
from pricefuse.features.tabular import Embeddings, FeatureMatrix, TabularFeaturizer
from pricefuse.metrics import smape_from_log

# libgomp reads OMP_WAIT_POLICY once, when the first booster library loads it; the boosters are
# imported lazily below, so setting the default here is early enough for library users too.
compat.apply_env_defaults()

MANIFEST = "gbdt.json"


def available_cores() -> int:
    """Cores this process may use (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class FitOptions:
    """What every booster needs to train: the gbdt section, the seed and a thread budget."""

    cfg: GbdtConfig
    seed: int
    n_jobs: int = 1


class Booster(Protocol):
    """A regressor on a FeatureMatrix, fitted with a validation set and early stopping."""

    name: ClassVar[str]
    suffix: ClassVar[str]  # model file extension, e.g. ".txt"

    @property
    def best_iteration(self) -> int:
        """Number of boosting rounds kept after early stopping."""
        ...

    def fit(
        self,
        train: FeatureMatrix,
        y_train: np.ndarray,
        valid: FeatureMatrix,
        y_valid: np.ndarray,
        options: FitOptions,
    ) -> Self: ...

    def predict(self, x: FeatureMatrix) -> np.ndarray: ...

    def feature_importance(self) -> np.ndarray:
        """Gain-type importance per feature, in feature order, summing to 1 (0s if none)."""
        ...

    def save(self, path: Path) -> Path: ...

    @classmethod
    def load(cls, path: Path) -> Self: ...

    @property
    def native(self) -> Any:
        """The library's own model object (for MLflow flavors and inspection)."""
        ...


def _normalised(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    total = values.sum()
    return values / total if total > 0 else values


def _require_fitted(model: Any, name: str) -> Any:
    if model is None:
        raise RuntimeError(f"{name} booster used before fit or load")
    return model


class _NativeBooster:
    """What the three boosters share: the wrapped native model and the fitted-or-not check.

    Subclasses set `name`, `suffix` and `_count_trees`, and implement fit/predict/importance.
    """

    name: ClassVar[str]
    suffix: ClassVar[str]

    def __init__(self, model: Any = None) -> None:
        self._model = model

    @property
    def native(self) -> Any:
        return _require_fitted(self._model, self.name)

    @property
    def best_iteration(self) -> int:
        return int(self._count_trees(self.native))

    @staticmethod
    def _count_trees(model: Any) -> int:
        raise NotImplementedError

    def save(self, path: Path) -> Path:
        self.native.save_model(str(path))
        return path


OBJECTIVES = ("l2", "huber")


def _check_objective(cfg: GbdtConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"gbdt.objective must be one of {OBJECTIVES}, got {cfg.objective!r}")


def _lightgbm_objective(cfg: GbdtConfig) -> dict[str, Any]:
    _check_objective(cfg)
    if cfg.objective == "huber":
        return {"objective": "huber", "alpha": cfg.huber_delta}
    return {"objective": "regression"}


def _xgboost_objective(cfg: GbdtConfig) -> dict[str, Any]:
    _check_objective(cfg)
    if cfg.objective == "huber":
        return {"objective": "reg:pseudohubererror", "huber_slope": cfg.huber_delta}
    return {"objective": "reg:squarederror"}


def _catboost_loss(cfg: GbdtConfig) -> str:
    _check_objective(cfg)
    return f"Huber:delta={cfg.huber_delta}" if cfg.objective == "huber" else "RMSE"


class LightGBMBooster(_NativeBooster):
    """LightGBM with native categorical splits on the unit / quantity-kind codes."""

    name: ClassVar[str] = "lightgbm"
    suffix: ClassVar[str] = ".txt"

    @staticmethod
    def _count_trees(model: Any) -> int:
        return model.num_trees()

    def fit(
        self,
        train: FeatureMatrix,
        y_train: np.ndarray,
        valid: FeatureMatrix,
        y_valid: np.ndarray,
        options: FitOptions,
    ) -> Self:
        import lightgbm as lgb

        cfg, own = options.cfg, options.cfg.lightgbm
        params = {
            **_lightgbm_objective(cfg),
            "learning_rate": cfg.learning_rate,
            "num_leaves": own.num_leaves,
            "min_child_samples": own.min_child_samples,
            "bagging_fraction": own.subsample,
            "bagging_freq": 1 if own.subsample < 1.0 else 0,
            "feature_fraction": own.colsample_bytree,
            "max_bin": cfg.max_bin,
            "seed": options.seed,
            "deterministic": True,
            "force_col_wise": True,
            "num_threads": options.n_jobs,
            "verbosity": -1,
        }
        dataset = lgb.Dataset(
            train.values,
            y_train,
            feature_name=list(train.names),
            categorical_feature=list(train.categorical),
            free_raw_data=True,
        )
        holdout = lgb.Dataset(valid.values, y_valid, reference=dataset)
        model = lgb.train(
            params,
            dataset,
            num_boost_round=cfg.n_estimators,
            valid_sets=[holdout],
            callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)],
        )
        # Keep only the best rounds, so predict/save/load never need to remember a cut-off.
        self._model = lgb.Booster(
            model_str=model.model_to_string(num_iteration=model.best_iteration)
        )
        return self

    def predict(self, x: FeatureMatrix) -> np.ndarray:
        return np.asarray(self.native.predict(x.values), dtype=np.float64)

    def feature_importance(self) -> np.ndarray:
        return _normalised(self.native.feature_importance(importance_type="gain"))

    @classmethod
    def load(cls, path: Path) -> Self:
        import lightgbm as lgb

        return cls(lgb.Booster(model_file=str(path)))


class XGBoostBooster(_NativeBooster):
    """XGBoost `hist` trees with categorical support declared through feature types."""

    name: ClassVar[str] = "xgboost"
    suffix: ClassVar[str] = ".ubj"

    @staticmethod
    def _count_trees(model: Any) -> int:
        return model.num_boosted_rounds()

    @staticmethod
    def _matrix(x: FeatureMatrix, label: np.ndarray | None = None, n_jobs: int = 1) -> Any:
        import xgboost as xgb

        categorical = set(x.categorical)
        return xgb.DMatrix(
            x.values,
            label=label,
            feature_names=list(x.names),
            feature_types=["c" if i in categorical else "q" for i in range(len(x.names))],
            enable_categorical=True,
            nthread=n_jobs,
        )

    def fit(
        self,
        train: FeatureMatrix,
        y_train: np.ndarray,
        valid: FeatureMatrix,
        y_valid: np.ndarray,
        options: FitOptions,
    ) -> Self:
        import xgboost as xgb

        cfg, own = options.cfg, options.cfg.xgboost
        params = {
            **_xgboost_objective(cfg),
            "eta": cfg.learning_rate,
            "max_depth": own.max_depth,
            "subsample": own.subsample,
            "colsample_bytree": own.colsample_bytree,
            "tree_method": "hist",
            "max_bin": cfg.max_bin,
            "seed": options.seed,
            "nthread": options.n_jobs,
        }
        holdout = self._matrix(valid, y_valid, options.n_jobs)
        model = xgb.train(
            params,
            self._matrix(train, y_train, options.n_jobs),
            num_boost_round=cfg.n_estimators,
            evals=[(holdout, "valid")],
            early_stopping_rounds=cfg.early_stopping_rounds,
            verbose_eval=False,
        )
        self._model = model[: model.best_iteration + 1]
        return self

    def predict(self, x: FeatureMatrix) -> np.ndarray:
        return np.asarray(self.native.predict(self._matrix(x)), dtype=np.float64)

    def feature_importance(self) -> np.ndarray:
        scores = self.native.get_score(importance_type="total_gain")
        return _normalised(np.array([scores.get(n, 0.0) for n in self.native.feature_names]))

    @classmethod
    def load(cls, path: Path) -> Self:
        import xgboost as xgb

        model = xgb.Booster()
        model.load_model(str(path))
        return cls(model)


class CatBoostBooster(_NativeBooster):
    """CatBoost symmetric trees; categorical codes go in as integers (-1 = unknown)."""

    name: ClassVar[str] = "catboost"
    suffix: ClassVar[str] = ".cbm"

    @staticmethod
    def _count_trees(model: Any) -> int:
        return model.tree_count_

    @staticmethod
    def _frame(x: FeatureMatrix) -> pd.DataFrame:
        """CatBoost rejects float or NaN categorical values: codes become ints, unknown -1."""
        frame = x.frame()
        for i in x.categorical:
            column = x.names[i]
            frame[column] = frame[column].fillna(-1).astype(np.int64)
        return frame

    def fit(
        self,
        train: FeatureMatrix,
        y_train: np.ndarray,
        valid: FeatureMatrix,
        y_valid: np.ndarray,
        options: FitOptions,
    ) -> Self:
        from catboost import CatBoostRegressor

        cfg = options.cfg
        model = CatBoostRegressor(
            iterations=cfg.n_estimators,
            learning_rate=cfg.learning_rate,
            depth=cfg.catboost.depth,
            border_count=cfg.max_bin,
            loss_function=_catboost_loss(cfg),
            random_seed=options.seed,
            thread_count=options.n_jobs,
            od_type="Iter",
            od_wait=cfg.early_stopping_rounds,
            use_best_model=True,
            allow_writing_files=False,
            verbose=False,
        )
        categorical = [train.names[i] for i in train.categorical]
        model.fit(
            self._frame(train),
            y_train,
            cat_features=categorical,
            eval_set=(self._frame(valid), y_valid),
        )
        self._model = model
        return self

    def predict(self, x: FeatureMatrix) -> np.ndarray:
        return np.asarray(self.native.predict(self._frame(x)), dtype=np.float64)

    def feature_importance(self) -> np.ndarray:
        return _normalised(self.native.get_feature_importance())

    def save(self, path: Path) -> Path:
        self.native.save_model(str(path), format="cbm")
        return path

    @classmethod
    def load(cls, path: Path) -> Self:
        from catboost import CatBoostRegressor

        return cls(CatBoostRegressor().load_model(str(path), format="cbm"))


BOOSTERS: dict[str, type[Booster]] = {
    b.name: b for b in (LightGBMBooster, XGBoostBooster, CatBoostBooster)
}


def booster_class(name: str) -> type[Booster]:
    """The Booster class for a name in params.gbdt.boosters."""
    try:
        return BOOSTERS[name]
    except KeyError:
        raise ValueError(f"unknown booster {name!r}; known: {', '.join(BOOSTERS)}") from None


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


@dataclass(frozen=True)
class FoldFeatures:
    """One fold's feature matrices, all built by a featurizer fitted on that fold's training rows.

    Why per fold: the featurizer fits PCA bases and category vocabularies. Fitted on every train
    row, it would let each OOF prediction see its own fold through them; fitted on the other
    folds, held rows are featurized exactly as test rows are.
    """

    fold: int
    held: np.ndarray  # boolean mask of the fold's rows
    featurizer: TabularFeaturizer
    x_fit: FeatureMatrix
    x_held: FeatureMatrix
    x_test: FeatureMatrix | None = None


def fold_features(
    train: pd.DataFrame,
    emb: Embeddings,
    folds: np.ndarray,
    cfg: GbdtConfig,
    seed: int,
    test: pd.DataFrame | None = None,
    test_emb: Embeddings | None = None,
) -> list[FoldFeatures]:
    """Per fold: fit the featurizer on the other folds, featurize fit, held and test rows."""
    if (test is None) != (test_emb is None):
        raise ValueError("pass both the test table and its embeddings, or neither")
    folds = np.asarray(folds)
    if len(folds) != len(train):
        raise ValueError(f"rows differ: table {len(train)}, folds {len(folds)}")
    fold_ids = tuple(int(k) for k in np.unique(folds))
    if len(fold_ids) < 2 or (folds < 0).any():
        raise ValueError(f"need >= 2 folds and every train row in one; got folds {fold_ids}")
    out = []
    for k in fold_ids:
        held = folds == k
        fit_rows, fit_emb = train[~held], emb.take(~held)
        featurizer = TabularFeaturizer(cfg.text_pca, cfg.image_pca, seed).fit(fit_rows, fit_emb)
        x_test = None
        if test is not None and test_emb is not None:
            x_test = featurizer.transform(test, test_emb)
        out.append(
            FoldFeatures(
                k,
                held,
                featurizer,
                featurizer.transform(fit_rows, fit_emb),
                featurizer.transform(train[held], emb.take(held)),
                x_test,
            )
        )
    return out


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


class GbdtPredictor:
    """Each fold's fitted featurizer and booster models: what serving loads and calls.

    On disk (`model_dir`): `gbdt.json` (manifest), `featurizer_<k>.joblib`, and
    `<booster>/fold_<k><suffix>` native model files. A row's prediction is the mean over folds of
    fold k's boosters on fold k's features.
    """

    def __init__(
        self,
        featurizers: Sequence[TabularFeaturizer],
        models: Mapping[str, Sequence[Booster]],
        clip: tuple[float, float],
        offsets: Sequence[float],
    ) -> None:
        if not models or any(len(m) != len(featurizers) for m in models.values()):
            raise ValueError("GbdtPredictor needs one model per fold featurizer for each booster")
        if len(offsets) != len(featurizers):
            raise ValueError("GbdtPredictor needs one target offset per fold")
        self.offsets = [float(v) for v in offsets]
        self.featurizers = list(featurizers)
        self.models = {name: list(fold_models) for name, fold_models in models.items()}
        self.clip = (float(clip[0]), float(clip[1]))

    @property
    def boosters(self) -> tuple[str, ...]:
        return tuple(self.models)

    def predict(
        self,
        parsed_df: pd.DataFrame,
        text_emb: np.ndarray,
        image_emb: np.ndarray,
        image_mask: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Booster name -> log1p price per row of `parsed_df` (embeddings aligned by row)."""
        emb = Embeddings(text_emb, image_emb, np.asarray(image_mask, dtype=bool))
        lo, hi = self.clip
        sums = {name: np.zeros(len(parsed_df)) for name in self.models}
        for k, featurizer in enumerate(self.featurizers):
            x = featurizer.transform(parsed_df, emb)
            for name, fold_models in self.models.items():
                sums[name] += np.clip(fold_models[k].predict(x) + self.offsets[k], lo, hi)
        return {name: total / len(self.featurizers) for name, total in sums.items()}

    def predict_members(self, batch: Any) -> dict[str, np.ndarray]:
        """The registry's serving interface (see pricefuse.members)."""
        return self.predict(batch.parsed, batch.text, batch.image, batch.image_mask)

    def save(self, model_dir: Path | str) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        featurizer_files = []
        for k, featurizer in enumerate(self.featurizers):
            name = f"featurizer_{k}.joblib"
            featurizer.save(model_dir / name)
            featurizer_files.append(name)
        files: dict[str, list[str]] = {}
        for name, fold_models in self.models.items():
            (model_dir / name).mkdir(exist_ok=True)
            files[name] = []
            for k, model in enumerate(fold_models):
                relative = f"{name}/fold_{k}{booster_class(name).suffix}"
                model.save(model_dir / relative)
                files[name].append(relative)
        manifest = {
            "featurizers": featurizer_files,
            "clip": list(self.clip),
            "offsets": self.offsets,
            "feature_names": list(self.featurizers[0].names),
            "models": files,
        }
        (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return model_dir

    @classmethod
    def load(cls, model_dir: Path | str) -> GbdtPredictor:
        model_dir = Path(model_dir)
        manifest_path = model_dir / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} not found: not a saved GbdtPredictor")
        manifest = json.loads(manifest_path.read_text())
        featurizers = [TabularFeaturizer.load(model_dir / f) for f in manifest["featurizers"]]
        models = {
            name: [booster_class(name).load(model_dir / rel) for rel in relatives]
            for name, relatives in manifest["models"].items()
        }
        return cls(featurizers, models, tuple(manifest["clip"]), manifest["offsets"])


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
