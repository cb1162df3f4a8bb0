"""Combine member predictions: a constrained log-space blend, or a stacked level-2 model.

Why log space: every member regresses log1p(price); a weighted mean there is a weighted geometric
mean of prices, which is what SMAPE (a relative error) rewards. Weights are fit on out-of-fold
predictions only, so the blend never sees a prediction made by a model that trained on that row.

Stacking: a level-2 model on the members' OOF predictions plus a few meta-features (has_image,
text length, quantity kind) can weigh members differently per kind of row, which one global blend
cannot. Its own OOF predictions come from nested folds (fit on the other folds' OOF rows), so the
comparison with the blend is honest; the ensemble keeps whichever scores better and logs both.
(The earlier nearest-neighbour correction is now the `knn` member: a blend weight on it is the
same correction, fit together with every other weight.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from pricefuse.core.metrics import smape
from pricefuse.data.units import QUANTITY_KINDS

LOG_CLIP = (np.log1p(0.01), np.log1p(100_000.0))


def clip_log(log_pred: np.ndarray) -> np.ndarray:
    """log1p predictions clipped to the sane positive range every served price lies in."""
    return np.clip(np.asarray(log_pred, dtype=np.float64), *LOG_CLIP)


def to_price(log_pred: np.ndarray) -> np.ndarray:
    """log1p predictions -> prices, clipped to a sane positive range first."""
    return np.expm1(clip_log(log_pred))


def blend(members: np.ndarray, weights: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """Weighted sum of member log predictions (columns) plus a log-space shift."""
    return np.asarray(members, dtype=np.float64) @ np.asarray(weights, dtype=np.float64) + shift


@dataclass(frozen=True)
class BlendWeights:
    members: tuple[str, ...]
    weights: tuple[float, ...]
    shift: float

    def apply(self, members: np.ndarray) -> np.ndarray:
        return blend(members, np.asarray(self.weights), self.shift)


def fit_blend_weights(
    members: np.ndarray,
    y_log: np.ndarray,
    names: Sequence[str],
    starts: Sequence[Sequence[float]] = (),
) -> BlendWeights:
    """Non-negative weights summing to 1, plus a log shift, minimising OOF SMAPE on prices.

    SMAPE is piecewise smooth, so SLSQP from several starts (equal weights, each member alone,
    any given start such as the hand-set blend) is enough for a handful of members; the best
    solution found wins.
    """
    x = np.asarray(members, dtype=np.float64)
    y = np.expm1(np.asarray(y_log, dtype=np.float64))
    n_members = x.shape[1]
    if n_members != len(names):
        raise ValueError(f"{n_members} member columns but {len(names)} names")

    def objective(theta: np.ndarray) -> float:
        return smape(y, to_price(blend(x, theta[:-1], theta[-1])))

    candidates = [np.full(n_members, 1.0 / n_members)]
    candidates += [np.eye(n_members)[i] for i in range(n_members)]
    candidates += [np.asarray(s, dtype=np.float64) / np.sum(s) for s in starts]
    constraints = [{"type": "eq", "fun": lambda t: np.sum(t[:-1]) - 1.0}]
    bounds = [(0.0, 1.0)] * n_members + [(-1.0, 1.0)]
    best_theta, best_value = None, np.inf
    for start in candidates:
        theta0 = np.append(start, 0.0)
        result = minimize(
            objective,
            theta0,
            method="SLSQP",
            bounds=bounds,
            constraints=constraints,
            options={"maxiter": 200, "ftol": 1e-7, "eps": 1e-4},
        )
        for theta in (result.x, theta0):
            w = np.clip(theta[:-1], 0.0, None)
            if w.sum() <= 0:
                continue
            theta = np.append(w / w.sum(), theta[-1])
            value = objective(theta)
            if value < best_value:
                best_theta, best_value = theta, value
    assert best_theta is not None
    return BlendWeights(
        members=tuple(names),
        weights=tuple(float(v) for v in best_theta[:-1]),
        shift=float(best_theta[-1]),
    )


STATE_FILE = "ensemble.json"
STACKERS = ("ridge", "lightgbm")


def meta_features(parsed: pd.DataFrame, image_mask: np.ndarray) -> np.ndarray:
    """(n, 2 + len(QUANTITY_KINDS)): has an image, log text length, one-hot quantity kind.

    Nothing here is fitted (the kinds are the parser's fixed set), so the same rows give the same
    meta-features in training, test and serving.
    """
    text_len = pd.to_numeric(parsed["text_len"], errors="coerce").fillna(0.0).to_numpy()
    kinds = parsed["quantity_kind"].astype(str).to_numpy()
    columns = [np.asarray(image_mask, dtype=np.float64), np.log1p(np.clip(text_len, 0.0, None))]
    columns += [(kinds == kind).astype(np.float64) for kind in QUANTITY_KINDS]
    return np.column_stack(columns)


class Stacker:
    """A level-2 regressor on [member log predictions, meta-features] -> log1p price.

    `ridge`: a ridge regression (coefficients saved as JSON). `lightgbm`: a small, heavily
    regularised LightGBM (saved in its text format). Neither is pickled.
    """

    def __init__(self, kind: str, alpha: float, seed: int, model: Any = None) -> None:
        if kind not in STACKERS:
            raise ValueError(f"unknown stacker {kind!r}; known: {', '.join(STACKERS)}")
        self.kind, self.alpha, self.seed, self.model = kind, alpha, seed, model

    def fit(self, x: np.ndarray, y_log: np.ndarray) -> Stacker:
        if self.kind == "ridge":
            from sklearn.linear_model import Ridge

            ridge = Ridge(alpha=self.alpha).fit(x, y_log)
            self.model = {"coef": ridge.coef_.tolist(), "intercept": float(ridge.intercept_)}
        else:
            import lightgbm as lgb

            params = {
                "objective": "huber",
                "alpha": 1.0,
                "learning_rate": 0.03,
                "num_leaves": 7,
                "min_child_samples": 50,
                "lambda_l2": 10.0,
                "seed": self.seed,
                "deterministic": True,
                "num_threads": 1,
                "verbosity": -1,
            }
            self.model = lgb.train(params, lgb.Dataset(x, y_log), num_boost_round=300)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("stacker used before fit or load")
        if self.kind == "ridge":
            return (
                np.asarray(x, np.float64) @ np.asarray(self.model["coef"]) + self.model["intercept"]
            )
        return np.asarray(self.model.predict(x), dtype=np.float64)

    def to_json(self, directory: Path) -> dict[str, Any]:
        if self.kind == "ridge":
            return {"kind": self.kind, "alpha": self.alpha, **self.model}
        path = directory / "stacker_lightgbm.txt"
        self.model.save_model(str(path))
        return {"kind": self.kind, "alpha": self.alpha, "file": path.name}

    @classmethod
    def from_json(cls, raw: dict[str, Any], directory: Path) -> Stacker:
        if raw["kind"] == "ridge":
            model = {"coef": raw["coef"], "intercept": raw["intercept"]}
        else:
            import lightgbm as lgb

            model = lgb.Booster(model_file=str(directory / raw["file"]))
        return cls(raw["kind"], float(raw["alpha"]), 0, model)


def stack_inputs(members: np.ndarray, meta: np.ndarray) -> np.ndarray:
    return np.hstack([np.asarray(members, np.float64), np.asarray(meta, np.float64)])


def stacker_oof(
    kind: str, x: np.ndarray, y_log: np.ndarray, folds: np.ndarray, alpha: float, seed: int
) -> np.ndarray:
    """Honest OOF predictions of a stacker: fold k's rows from a stacker fit on the others."""
    out = np.zeros(len(y_log))
    for k in np.unique(folds):
        held = folds == k
        out[held] = Stacker(kind, alpha, seed).fit(x[~held], y_log[~held]).predict(x[held])
    return out


@dataclass
class EnsembleState:
    """Everything needed to turn member predictions into final log prices (JSON, + LightGBM
    text when that stacker won). `method` is "blend" or a stacker kind."""

    blend: BlendWeights
    method: str = "blend"
    stacker: Stacker | None = None

    @property
    def members(self) -> tuple[str, ...]:
        return self.blend.members

    def save(self, directory: Path | str) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {"method": self.method, "blend": asdict(self.blend)}
        if self.stacker is not None:
            payload["stacker"] = self.stacker.to_json(directory)
        path = directory / STATE_FILE
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path

    @staticmethod
    def load(directory: Path | str) -> EnsembleState:
        directory = Path(directory)
        payload = json.loads((directory / STATE_FILE).read_text())
        b = payload["blend"]
        weights = BlendWeights(tuple(b["members"]), tuple(b["weights"]), float(b["shift"]))
        stacker = payload.get("stacker")
        return EnsembleState(
            weights,
            payload.get("method", "blend"),
            Stacker.from_json(stacker, directory) if stacker else None,
        )

    def predict_log(self, members: np.ndarray, meta: np.ndarray) -> np.ndarray:
        """Final log1p predictions for member columns ordered as `self.members`."""
        if self.method == "blend" or self.stacker is None:
            return self.blend.apply(members)
        return self.stacker.predict(stack_inputs(members, meta))


@dataclass
class EnsembleFit:
    """What `fit_ensemble` returns: the state to save, its OOF predictions and the metrics."""

    state: EnsembleState
    oof: np.ndarray
    metrics: dict[str, float]


def fit_ensemble(
    members_oof: np.ndarray,
    names: Sequence[str],
    y_log: np.ndarray,
    folds: np.ndarray,
    meta: np.ndarray,
    stackers: Sequence[str],
    alpha: float,
    seed: int,
) -> EnsembleFit:
    """Fit the blend and every configured stacker on OOF rows; keep the best on OOF SMAPE.

    Metrics: `smape_oof_<member>`, `smape_oof_mean` (equal weights), `smape_oof_blend`,
    `smape_oof_stack_<kind>`, `weight_<member>`, `blend_shift`, and `smape_oof` / `smape_fold_k`
    of the kept method.
    """
    x = np.asarray(members_oof, dtype=np.float64)
    y_log = np.asarray(y_log, dtype=np.float64)
    y = np.expm1(y_log)
    folds = np.asarray(folds)
    metrics: dict[str, float] = {}
    for i, name in enumerate(names):
        metrics[f"smape_oof_{name}"] = smape(y, to_price(x[:, i]))
    equal = np.full(len(names), 1.0 / len(names))
    metrics["smape_oof_mean"] = smape(y, to_price(blend(x, equal)))
    weights = fit_blend_weights(x, y_log, names)
    candidates = {"blend": weights.apply(x)}
    metrics["smape_oof_blend"] = smape(y, to_price(candidates["blend"]))
    for name, w in zip(names, weights.weights, strict=True):
        metrics[f"weight_{name}"] = w
    metrics["blend_shift"] = weights.shift
    inputs = stack_inputs(x, meta)
    for kind in stackers:
        candidates[kind] = stacker_oof(kind, inputs, y_log, folds, alpha, seed)
        metrics[f"smape_oof_stack_{kind}"] = smape(y, to_price(candidates[kind]))
    scores = {m: smape(y, to_price(p)) for m, p in candidates.items()}
    method = min(scores, key=lambda m: scores[m])
    stacker = None if method == "blend" else Stacker(method, alpha, seed).fit(inputs, y_log)
    oof = candidates[method]
    metrics["smape_oof"] = scores[method]
    for k in sorted(set(folds.tolist())):
        held = folds == k
        metrics[f"smape_fold_{k}"] = smape(y[held], to_price(oof[held]))
    return EnsembleFit(EnsembleState(weights, method, stacker), oof, metrics)


def leave_one_out(
    members_oof: np.ndarray, names: Sequence[str], y_log: np.ndarray
) -> dict[str, float]:
    """OOF SMAPE of the fitted blend without each member in turn (what each member adds)."""
    x = np.asarray(members_oof, dtype=np.float64)
    y = np.expm1(np.asarray(y_log, dtype=np.float64))
    out: dict[str, float] = {}
    if len(names) < 2:
        return out
    for i, name in enumerate(names):
        keep = [j for j in range(len(names)) if j != i]
        rest = [names[j] for j in keep]
        weights = fit_blend_weights(x[:, keep], y_log, rest)
        out[name] = smape(y, to_price(weights.apply(x[:, keep])))
    return out
