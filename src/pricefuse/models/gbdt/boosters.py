"""The three gradient-boosted tree libraries (LightGBM, XGBoost, CatBoost) behind one interface.

Why three boosters: they split categoricals, missing values and leaves differently, so their
errors are only partly correlated and the ensemble gains from each. Why one interface: the
fold loop (models.gbdt.training), the saved layout and the serving path (models.gbdt.predictor)
are written once and cannot drift per booster.

The loss is `gbdt.objective`: squared error, or Huber with `huber_delta` (default). Why Huber:
SMAPE is close to the absolute error of log prices, so mispriced listings should pull the trees
less than squared error lets them. Each booster early-stops on the validation set it is given and
keeps only the rounds up to its best iteration.

Device (`gbdt.device`, resolved to `FitOptions.device`): on "cuda" XGBoost trains with
`device="cuda"` and CatBoost with `task_type="GPU"`; LightGBM always trains on the CPU, since
its pip wheel is a CPU build (a CUDA LightGBM must be compiled from source). Predictions run on
the CPU whatever trained the model: that is where the ensemble and the served model run them.
GPU training is not bit-reproducible (both libraries sum in a non-deterministic order).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import numpy as np
import pandas as pd

from pricefuse.core import compat
from pricefuse.core.config import OWN_VIEW_SUFFIX, UNIT_SUFFIX, GbdtConfig
from pricefuse.features.tabular import EXTRA_PREFIXES, FeatureMatrix

# libgomp reads OMP_WAIT_POLICY once, when the first booster library loads it; the boosters are
# imported lazily below, so setting the default here is early enough for library users too.
compat.apply_env_defaults()


def available_cores() -> int:
    """Cores this process may use (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class FitOptions:
    """What every booster needs to train: the gbdt section, the seed, a thread budget and the
    device ("cpu" or "cuda", `gbdt.device` resolved by pricefuse.core.device)."""

    cfg: GbdtConfig
    seed: int
    n_jobs: int = 1
    device: str = "cpu"


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
# Inputs of at most this many rows predict on one thread (served single rows).
SMALL_PREDICT_ROWS = 4


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
    """LightGBM with native categorical splits on the unit / quantity-kind codes. Always on the
    CPU, whatever `FitOptions.device` says: the pip wheel has no CUDA support."""

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
        # A few rows run on one thread: waking a pool for a handful of tree walks costs more than
        # the walks (the same predictions either way; trees are summed per row).
        threads = {"num_threads": 1} if len(x.values) <= SMALL_PREDICT_ROWS else {}
        return np.asarray(self.native.predict(x.values, **threads), dtype=np.float64)

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

        cfg = options.cfg
        holdout = self._matrix(valid, y_valid, options.n_jobs)
        model = xgb.train(
            xgboost_params(options),
            self._matrix(train, y_train, options.n_jobs),
            num_boost_round=cfg.n_estimators,
            evals=[(holdout, "valid")],
            early_stopping_rounds=cfg.early_stopping_rounds,
            verbose_eval=False,
        )
        self._model = model[: model.best_iteration + 1]
        if options.device != "cpu":  # predict where the data is (see the module docstring)
            self._model.set_param({"device": "cpu"})
        return self

    def predict(self, x: FeatureMatrix) -> np.ndarray:
        """`inplace_predict` on the values: the same predictions as through a DMatrix (tested;
        the booster keeps the categorical feature types it was trained with) without building
        one, which was half of a served row's XGBoost time. The names are checked here, as the
        DMatrix path checked them."""
        expected = self._feature_names()
        if expected and tuple(x.names) != expected:
            raise ValueError(
                f"XGBoost model expects {len(expected)} features {expected[:3]}..., got "
                f"{len(x.names)} {tuple(x.names)[:3]}..."
            )
        return np.asarray(self.native.inplace_predict(x.values), dtype=np.float64)

    def _feature_names(self) -> tuple[str, ...]:
        """The model's feature names, read from the library once (each read is a C call that
        copies every name)."""
        names = getattr(self, "_names", None)
        if names is None or names[0] is not self._model:
            names = (self._model, tuple(self.native.feature_names or ()))
            self._names = names
        return names[1]

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

        model = CatBoostRegressor(**catboost_params(options))
        categorical = [train.names[i] for i in train.categorical]
        model.fit(
            self._frame(train),
            y_train,
            cat_features=categorical,
            eval_set=(self._frame(valid), y_valid),
        )
        self._model = model
        return self

    @staticmethod
    def _rows(x: FeatureMatrix) -> np.ndarray:
        """`_frame`'s values as an object array (codes as ints, unknown -1): the same predictions
        (tested) at a tenth of the cost on a served row, where CatBoost's column-by-column
        reading of a DataFrame took most of its predict time."""
        rows = x.values.astype(object)
        for i in x.categorical:
            codes = x.values[:, i]
            rows[:, i] = np.where(np.isnan(codes), -1, codes).astype(np.int64)
        return rows

    def predict(self, x: FeatureMatrix) -> np.ndarray:
        # A few rows on one thread, as LightGBM and XGBoost: the same predictions without
        # waking a pool for a handful of rows.
        threads = 1 if len(x.values) <= SMALL_PREDICT_ROWS else -1
        return np.asarray(
            self.native.predict(self._rows(x), thread_count=threads), dtype=np.float64
        )

    def feature_importance(self) -> np.ndarray:
        return _normalised(self.native.get_feature_importance())

    def save(self, path: Path) -> Path:
        self.native.save_model(str(path), format="cbm")
        return path

    @classmethod
    def load(cls, path: Path) -> Self:
        from catboost import CatBoostRegressor

        return cls(CatBoostRegressor().load_model(str(path), format="cbm"))


def xgboost_params(options: FitOptions) -> dict[str, Any]:
    """`xgb.train`'s parameters: `hist` trees, on the GPU when `options.device` is "cuda".

    With the Huber objective `base_score` is 0.0: the targets are already centred on the fold's
    training median (models.gbdt.training), so 0 is that median; left unset, XGBoost would
    estimate an intercept of its own for `reg:pseudohubererror` from the centred targets, a
    second, different centre on top of the median."""
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
    if cfg.objective == "huber":
        params["base_score"] = 0.0  # the fold median: see the docstring
    if options.device == "cuda":
        params["device"] = "cuda"
    return params


def catboost_params(options: FitOptions) -> dict[str, Any]:
    """`CatBoostRegressor`'s parameters: on the GPU (`task_type="GPU"`, the current device) when
    `options.device` is "cuda"."""
    cfg = options.cfg
    params: dict[str, Any] = {
        "iterations": cfg.n_estimators,
        "learning_rate": cfg.learning_rate,
        "depth": cfg.catboost.depth,
        "border_count": cfg.max_bin,
        "loss_function": _catboost_loss(cfg),
        "random_seed": options.seed,
        "thread_count": options.n_jobs,
        "od_type": "Iter",
        "od_wait": cfg.early_stopping_rounds,
        "use_best_model": True,
        "allow_writing_files": False,
        "verbose": False,
    }
    if options.device == "cuda":
        params["task_type"] = "GPU"
        params["devices"] = "0"  # the first GPU CUDA_VISIBLE_DEVICES leaves visible
    return params


BOOSTERS: dict[str, type[Booster]] = {
    b.name: b for b in (LightGBMBooster, XGBoostBooster, CatBoostBooster)
}


def booster_class(name: str) -> type[Booster]:
    """The Booster class for a name in params.gbdt.boosters."""
    try:
        return BOOSTERS[name]
    except KeyError:
        raise ValueError(f"unknown booster {name!r}; known: {', '.join(BOOSTERS)}") from None


# The FeatureMatrix column a per-unit member's target and prediction are shifted by: log1p of the
# canonical total quantity (pricefuse.data.catalog), NaN or 0 where unknown.
UNIT_BASE_COLUMN = "log_quantity"


@dataclass(frozen=True)
class MemberKind:
    """What a gbdt member is: its booster kind, whether it is trained on log price per
    canonical unit (`per_unit`, member `<booster>_unit`), and whether it reads only its own view
    of the features, without the `member_*` / `nbr_*` columns (`own_view`, member
    `<booster>_own`, see `view_columns`)."""

    booster: str
    per_unit: bool = False
    own_view: bool = False


# A member name's suffix -> its kind's flags (GbdtConfig.members writes the names with
# pricefuse.core.config.GBDT_VARIANTS' suffixes); no suffix is a plain booster.
_SUFFIX_FLAGS: dict[str, dict[str, bool]] = {
    UNIT_SUFFIX: {"per_unit": True},
    OWN_VIEW_SUFFIX: {"own_view": True},
}


def member_kind(member: str) -> MemberKind:
    """The MemberKind of a gbdt member name: `lightgbm` -> MemberKind("lightgbm"),
    `lightgbm_unit` -> per unit, `lightgbm_own` -> own view (GbdtConfig.members writes the
    names). The kind is checked: an unknown one is the ValueError of `booster_class`."""
    kind = MemberKind(member)
    for suffix, flags in _SUFFIX_FLAGS.items():
        if member.endswith(suffix):
            kind = MemberKind(member.removesuffix(suffix), **flags)
            break
    booster_class(kind.booster)
    return kind


def view_columns(names: Sequence[str], own_view: bool) -> list[int] | None:
    """The indices, in order, of the columns an own-view member reads: every feature whose
    name does not start with one of tabular's EXTRA_PREFIXES (the stacked `member_*` and the
    neighbour `nbr_*` columns); None (all columns) for any other member. Training and serving
    both select through this (`member_view`, and the predictor's merged models)."""
    if not own_view:
        return None
    return [i for i, name in enumerate(names) if not name.startswith(EXTRA_PREFIXES)]


def member_view(x: FeatureMatrix, kind: MemberKind) -> FeatureMatrix:
    """The features member `kind` is trained on and predicts from: `x` itself, or for an
    own-view member its `view_columns` (categorical indices renumbered to the subset)."""
    columns = view_columns(x.names, kind.own_view)
    if columns is None:
        return x
    position = {old: new for new, old in enumerate(columns)}
    return FeatureMatrix(
        x.values[:, columns],
        tuple(x.names[i] for i in columns),
        tuple(position[i] for i in x.categorical if i in position),
    )


def unit_base(x: FeatureMatrix, per_unit: bool) -> np.ndarray | float:
    """What a member's target is shifted by, per row of `x`: log1p(quantity) from the features'
    `log_quantity` column (0 where unknown) for a per-unit member, 0 otherwise.

    Why from the features: training, OOF, test and serving then all compute it alike from the
    same matrix the booster reads, and a per-unit member predicts log price per canonical unit
    (`target - unit_base`), whose level varies across products far less than the price's.
    """
    if not per_unit:
        return 0.0
    if UNIT_BASE_COLUMN not in x.names:
        raise ValueError(f"a per-unit gbdt member needs the {UNIT_BASE_COLUMN!r} feature")
    values = np.asarray(x.values[:, x.names.index(UNIT_BASE_COLUMN)], dtype=np.float64)
    return np.where(np.isfinite(values), values, 0.0)


def member_prediction(
    raw: np.ndarray, offset: float, base: np.ndarray | float, clip: tuple[float, float]
) -> np.ndarray:
    """A fold model's log1p price: its raw output plus the fold's target offset and the rows'
    `unit_base`, clipped to `clip` (models.gbdt.training.clip_range). Training and serving both
    call this, so OOF, test and served predictions add the same numbers in the same order."""
    return np.clip(raw + offset + base, clip[0], clip[1])
