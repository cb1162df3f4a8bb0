"""Exact nearest-neighbour search and the statistics of the neighbours' log prices: faiss
inner-product indexes on normalised embeddings, scikit-learn brute-force cosine search on sparse
TF-IDF rows, weighted by exp(-decay * (1 - s)) with an optional band around the median."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

SPACES = ("tfidf_name", "tfidf_text", "text_embedding", "image")
STATS = ("mean", "median", "std", "top1_sim", "top1")
PREFIX = "nbr_"


# Queries per search batch: bounds the dense similarity block (batch x keys floats).
SEARCH_BATCH = 2048


def feature_names(spaces: tuple[str, ...]) -> list[str]:
    return [f"{PREFIX}{space}_{stat}" for space in spaces for stat in STATS]


@dataclass(frozen=True)
class NeighbourRows:
    """The inputs of the neighbour search for a set of rows (arrays aligned with `parsed`)."""

    parsed: pd.DataFrame
    text: np.ndarray
    image: np.ndarray
    image_mask: np.ndarray

    def take(self, rows: np.ndarray) -> NeighbourRows:
        return NeighbourRows(
            self.parsed.iloc[rows].reset_index(drop=True),
            self.text[rows],
            self.image[rows],
            np.asarray(self.image_mask, dtype=bool)[rows],
        )

    def __len__(self) -> int:
        return len(self.parsed)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def dense_index(keys: np.ndarray) -> Any:
    """The exact inner-product faiss index of the normalised keys (what `search_dense` asks)."""
    import faiss

    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(_normalise(keys))
    return index


def sparse_index(keys: Any, k: int) -> Any:
    """scikit-learn's brute-force cosine search over the sparse keys (what `search_sparse` asks)."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(keys)


def search_dense(
    queries: np.ndarray, keys: np.ndarray, k: int, index: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, key indices), each (n, k), most similar first; exact cosine via faiss.
    `index`: `dense_index(keys)` when the caller keeps one."""
    index = index if index is not None else dense_index(keys)
    sims, idx = index.search(_normalise(queries), k)
    return sims.astype(np.float64), idx


def search_sparse(
    queries: Any, keys: Any, k: int, index: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, key indices), each (n >= 1, k), most similar first; exact cosine, brute
    force. `index`: `sparse_index(keys, k)` when the caller keeps one."""
    index = index if index is not None else sparse_index(keys, k)
    sims, idx = [], []
    for start in range(0, queries.shape[0], SEARCH_BATCH):
        distance, found = index.kneighbors(queries[start : start + SEARCH_BATCH])
        sims.append(1.0 - distance)
        idx.append(found)
    return np.vstack(sims), np.vstack(idx)


def neighbour_stats(sims: np.ndarray, values: np.ndarray, decay: float, band: float) -> np.ndarray:
    """(n, len(STATS)) statistics of each row's neighbour values (columns: STATS order).

    `sims` and `values` are (n, k), most similar first. Weight = exp(-decay * (1 - sim)).
    """
    sims = np.asarray(sims, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    keep = np.ones_like(values, dtype=bool)
    median = np.median(values, axis=1)
    if band > 0:
        keep = np.abs(values - median[:, None]) <= band
        keep[:, 0] |= ~keep.any(axis=1)  # never drop every neighbour
    weights = np.exp(-decay * (1.0 - np.clip(sims, -1.0, 1.0))) * keep
    total = np.maximum(weights.sum(axis=1), 1e-12)
    mean = (weights * values).sum(axis=1) / total
    spread = np.sqrt((weights * (values - mean[:, None]) ** 2).sum(axis=1) / total)
    return np.column_stack([mean, median, spread, sims[:, 0], values[:, 0]])
