"""Blend member predictions in log space and correct them with nearest neighbours.

Why log space: every member regresses log1p(price); a weighted mean there is a weighted geometric
mean of prices, which is what SMAPE (a relative error) rewards. Weights are fit on out-of-fold
predictions only, so the blend never sees a prediction made by a model that trained on that row.

Nearest-neighbour correction (top teams' trick for near-duplicate listings): the catalogue repeats
the same product under different pack sizes and sellers, so the prices of the closest training
items in embedding space carry information no single model captured. The corrected prediction is
`(1 - alpha) * blend + alpha * knn_mean`, with `alpha` fit on OOF predictions where each row's
neighbours come only from *other* folds (no leakage of its own price or of its fold-mates).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from pricefuse.metrics import smape

LOG_CLIP = (np.log1p(0.01), np.log1p(100_000.0))


def to_price(log_pred: np.ndarray) -> np.ndarray:
    """log1p predictions -> prices, clipped to a sane positive range first."""
    return np.expm1(np.clip(np.asarray(log_pred, dtype=np.float64), *LOG_CLIP))


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


def _normalise(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def knn_mean(
    queries: np.ndarray,
    keys: np.ndarray,
    key_values: np.ndarray,
    k: int,
    query_groups: np.ndarray | None = None,
    key_groups: np.ndarray | None = None,
    chunk: int = 2048,
) -> np.ndarray:
    """Similarity-weighted mean of the values of each query's k most cosine-similar keys.

    When groups are given, a key in the same group as the query is never a neighbour (used for
    out-of-fold neighbours: group = fold).
    """
    q = _normalise(queries)
    kv = _normalise(keys)
    values = np.asarray(key_values, dtype=np.float64)
    k = int(min(k, len(kv)))
    if k < 1:
        raise ValueError("knn_mean needs at least one key")
    out = np.empty(len(q), dtype=np.float64)
    for start in range(0, len(q), chunk):
        sims = q[start : start + chunk] @ kv.T
        if query_groups is not None and key_groups is not None:
            same = query_groups[start : start + chunk, None] == key_groups[None, :]
            sims = np.where(same, -np.inf, sims)
        idx = np.argpartition(-sims, kth=k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sims, idx, axis=1)
        weights = np.where(np.isfinite(top), np.maximum(top, 0.0) + 1e-6, 0.0)
        neighbour_values = values[idx]
        total = weights.sum(axis=1)
        fallback = values.mean()
        out[start : start + chunk] = np.where(
            total > 0, (weights * neighbour_values).sum(axis=1) / np.maximum(total, 1e-12), fallback
        )
    return out


@dataclass(frozen=True)
class KnnCorrection:
    k: int
    alpha: float

    def apply(self, blended: np.ndarray, neighbour_mean: np.ndarray) -> np.ndarray:
        return (1.0 - self.alpha) * np.asarray(blended) + self.alpha * np.asarray(neighbour_mean)


def fit_knn_alpha(
    blended_oof: np.ndarray, neighbour_mean_oof: np.ndarray, y_log: np.ndarray, k: int
) -> KnnCorrection:
    """Grid-search the mixing weight alpha in [0, 1] on OOF SMAPE (0 = no correction)."""
    y = np.expm1(np.asarray(y_log, dtype=np.float64))
    grid = np.round(np.linspace(0.0, 1.0, 41), 3)
    scores = [smape(y, to_price((1 - a) * blended_oof + a * neighbour_mean_oof)) for a in grid]
    return KnnCorrection(k=k, alpha=float(grid[int(np.argmin(scores))]))


@dataclass(frozen=True)
class EnsembleState:
    """Everything needed to turn member predictions into final prices (saved as JSON + NPZ)."""

    blend: BlendWeights
    knn: KnnCorrection | None

    def save(
        self, directory: Path | str, knn_keys: np.ndarray | None, knn_values: np.ndarray | None
    ) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"blend": asdict(self.blend), "knn": asdict(self.knn) if self.knn else None}
        (directory / "ensemble.json").write_text(json.dumps(payload, indent=2) + "\n")
        if self.knn is not None:
            if knn_keys is None or knn_values is None:
                raise ValueError("KNN correction needs its keys and values saved")
            np.savez_compressed(
                directory / "knn_index.npz",
                keys=_normalise(knn_keys).astype(np.float16),
                values=np.asarray(knn_values, dtype=np.float32),
            )

    @staticmethod
    def load(directory: Path | str) -> tuple[EnsembleState, np.ndarray | None, np.ndarray | None]:
        directory = Path(directory)
        payload = json.loads((directory / "ensemble.json").read_text())
        b = payload["blend"]
        weights = BlendWeights(tuple(b["members"]), tuple(b["weights"]), float(b["shift"]))
        knn = KnnCorrection(**payload["knn"]) if payload["knn"] else None
        keys = values = None
        if knn is not None:
            data = np.load(directory / "knn_index.npz")
            keys, values = data["keys"].astype(np.float32), data["values"].astype(np.float64)
        return EnsembleState(weights, knn), keys, values

    def predict_log(
        self,
        members: np.ndarray,
        queries: np.ndarray | None,
        keys: np.ndarray | None,
        values: np.ndarray | None,
    ) -> np.ndarray:
        """Final log1p predictions for member columns ordered as `self.blend.members`."""
        blended = self.blend.apply(members)
        if self.knn is None or self.knn.alpha == 0.0:
            return blended
        if queries is None or keys is None or values is None:
            raise ValueError("KNN correction needs query embeddings and the saved index")
        return self.knn.apply(blended, knn_mean(queries, keys, values, self.knn.k))
