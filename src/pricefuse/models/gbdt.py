"""Gradient-boosted trees (LightGBM, XGBoost, CatBoost) behind one small interface.

Why three boosters: they split categoricals, missing values and leaves differently, so their
errors are only partly correlated and the ensemble gains from each. Why one interface: the
fold loop, the saved layout and the serving path are written once and cannot drift per booster.

Every booster trains on log1p(price) with squared error and early-stops on the held-out fold of
the fold loop. Picking one number (the best iteration) on the fold that is then scored biases
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
FEATURIZER_FILE = "featurizer.joblib"


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
            "objective": "regression",
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
            "objective": "reg:squarederror",
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
            loss_function="RMSE",
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


def train_kfold_boosters(
    x: FeatureMatrix,
    y: np.ndarray,
    folds: np.ndarray,
    cfg: GbdtConfig,
    seed: int,
    x_test: FeatureMatrix | None = None,
    n_jobs: int | None = None,
    on_fold_done: Callable[[str, int], None] | None = None,
) -> KFoldResult:
    """Train every booster in `cfg.boosters` on the same folds (`folds[i]` = fold of row i).

    Each fold model trains on the other folds and early-stops on its own fold; its predictions on
    that fold form the OOF column, and the test prediction is the mean over fold models.
    Importances are averaged over folds. `on_fold_done(booster, fold)` reports progress.
    """
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    if len(y) != len(x) or len(folds) != len(x):
        raise ValueError(f"rows differ: features {len(x)}, targets {len(y)}, folds {len(folds)}")
    if not np.isfinite(y).all():
        raise ValueError("targets contain NaN or infinite values")
    fold_ids = tuple(int(k) for k in np.unique(folds) if k >= 0)
    if len(fold_ids) < 2 or (folds < 0).any():
        raise ValueError(f"need >= 2 folds and every train row in one; got folds {fold_ids}")
    options = FitOptions(cfg, seed, n_jobs or available_cores())
    lo, hi = clip_range(y)
    result = KFoldResult(tuple(x.names), fold_ids, (lo, hi))
    for name in cfg.boosters:
        cls = booster_class(name)
        oof = np.zeros(len(y))
        test_sum = np.zeros(len(x_test)) if x_test is not None else None
        models: list[Booster] = []
        for k in fold_ids:
            held = folds == k
            model = cls().fit(x.take(~held), y[~held], x.take(held), y[held], options)
            oof[held] = np.clip(model.predict(x.take(held)), lo, hi)
            if test_sum is not None and x_test is not None:
                test_sum += np.clip(model.predict(x_test), lo, hi)
            result.fold_smape.setdefault(name, {})[k] = smape_from_log(y[held], oof[held])
            models.append(model)
            if on_fold_done is not None:
                on_fold_done(name, k)
        result.oof[name] = oof
        result.oof_smape[name] = smape_from_log(y, oof)
        if test_sum is not None:
            result.test[name] = test_sum / len(fold_ids)
        result.importance[name] = np.mean([m.feature_importance() for m in models], axis=0)
        result.best_iterations[name] = [m.best_iteration for m in models]
        result.models[name] = models
    return result


class GbdtPredictor:
    """The fitted featurizer plus every booster's fold models: what serving loads and calls.

    On disk (`model_dir`): `gbdt.json` (manifest), `featurizer.joblib`, and
    `<booster>/fold_<k><suffix>` native model files.
    """

    def __init__(
        self,
        featurizer: TabularFeaturizer,
        models: Mapping[str, Sequence[Booster]],
        clip: tuple[float, float],
    ) -> None:
        if not models or any(len(m) == 0 for m in models.values()):
            raise ValueError("GbdtPredictor needs at least one fold model per booster")
        self.featurizer = featurizer
        self.models = {name: list(fold_models) for name, fold_models in models.items()}
        self.clip = (float(clip[0]), float(clip[1]))

    @property
    def boosters(self) -> tuple[str, ...]:
        return tuple(self.models)

    def predict_features(self, x: FeatureMatrix) -> dict[str, np.ndarray]:
        """Booster name -> log1p price, mean over fold models, clipped to the training range."""
        lo, hi = self.clip
        return {
            name: np.mean([np.clip(m.predict(x), lo, hi) for m in fold_models], axis=0)
            for name, fold_models in self.models.items()
        }

    def predict(
        self,
        parsed_df: pd.DataFrame,
        text_emb: np.ndarray,
        image_emb: np.ndarray,
        image_mask: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Booster name -> log1p price per row of `parsed_df` (embeddings aligned by row)."""
        emb = Embeddings(text_emb, image_emb, np.asarray(image_mask, dtype=bool))
        return self.predict_features(self.featurizer.transform(parsed_df, emb))

    def save(self, model_dir: Path | str) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        self.featurizer.save(model_dir / FEATURIZER_FILE)
        files: dict[str, list[str]] = {}
        for name, fold_models in self.models.items():
            (model_dir / name).mkdir(exist_ok=True)
            files[name] = []
            for k, model in enumerate(fold_models):
                relative = f"{name}/fold_{k}{booster_class(name).suffix}"
                model.save(model_dir / relative)
                files[name].append(relative)
        manifest = {
            "featurizer": FEATURIZER_FILE,
            "clip": list(self.clip),
            "feature_names": list(self.featurizer.names),
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
        featurizer = TabularFeaturizer.load(model_dir / manifest["featurizer"])
        models = {
            name: [booster_class(name).load(model_dir / rel) for rel in relatives]
            for name, relatives in manifest["models"].items()
        }
        return cls(featurizer, models, tuple(manifest["clip"]))


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
    """Fit the featurizer on train, then every booster on the given folds."""
    if (test is None) != (test_emb is None):
        raise ValueError("pass both the test table and its embeddings, or neither")
    featurizer = TabularFeaturizer(cfg.text_pca, cfg.image_pca, seed).fit(train, train_emb)
    x = featurizer.transform(train, train_emb)
    x_test = None if test is None or test_emb is None else featurizer.transform(test, test_emb)
    kfold = train_kfold_boosters(x, y, folds, cfg, seed, x_test, n_jobs, on_fold_done)
    return GbdtFit(GbdtPredictor(featurizer, kfold.models, kfold.clip), kfold)
