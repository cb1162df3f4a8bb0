"""Exact nearest-neighbour search and the statistics of the neighbours' log prices: faiss
inner-product indexes on normalised embeddings, brute-force cosine search on sparse TF-IDF rows
(split over worker processes), weighted by exp(-decay * (1 - s)) with an optional band around the
median.

The sparse search computes exactly what scikit-learn's `NearestNeighbors(metric="cosine",
algorithm="brute").kneighbors` computes, with the same operations in the same order (l2-normalised
rows, scikit-learn's sparse x sparse -> dense product, distance = clip(1 - s, 0, 2), argpartition
then argsort of each row), so it returns the same neighbours, ties included, and the same
similarities bit for bit; what differs is that the keys are normalised and transposed once per
index instead of once per block of queries, that the dense similarity block is small and bounded
(`SEARCH_BLOCK_BYTES`), and that blocks of queries run in parallel in forked worker processes
(`n_jobs`; the product holds the GIL, so threads would not scale). Each query row's result
depends on that row alone, which is why any split of the queries gives the same answer.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

SPACES = ("tfidf_name", "tfidf_text", "text_embedding", "image", "llm_embedding")
# The space read from the opt-in LLM text block (embed.llm): refused while the block is off.
LLM_SPACE = "llm_embedding"
STATS = ("mean", "median", "std", "top1_sim", "top1")
PREFIX = "nbr_"


# Bytes of one block of the sparse search, per process: the dense similarity block (queries x
# keys floats) and argpartition's int64 indices of it. 16 MiB is ~18 queries against 75,000 keys:
# each worker's share stays small, the per-block overhead is noise next to the product, and the
# arrays stay below glibc's mmap threshold, so blocks reuse heap memory instead of faulting in
# fresh pages (64 MiB blocks spent ~10% of the search in the kernel; measured, no faster).
SEARCH_BLOCK_BYTES = 16 * 2**20
# Below this many (query, key) pairs (~0.1-0.3 s of work) the sparse search stays in this process:
# forking workers would cost more than it saves (e.g. a served request of a few rows).
PARALLEL_MIN_PAIRS = 2**24


def feature_names(spaces: tuple[str, ...]) -> list[str]:
    return [f"{PREFIX}{space}_{stat}" for space in spaces for stat in STATS]


@dataclass(frozen=True)
class NeighbourRows:
    """The inputs of the neighbour search for a set of rows (arrays aligned with `parsed`);
    `llm`: the LLM text block, None when embed did not compute it."""

    parsed: pd.DataFrame
    text: np.ndarray
    image: np.ndarray
    image_mask: np.ndarray
    llm: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> NeighbourRows:
        return NeighbourRows(
            self.parsed.iloc[rows].reset_index(drop=True),
            self.text[rows],
            self.image[rows],
            np.asarray(self.image_mask, dtype=bool)[rows],
            None if self.llm is None else self.llm[rows],
        )

    def __len__(self) -> int:
        return len(self.parsed)


def resolve_n_jobs(n_jobs: int) -> int:
    """Worker count for `neighbours.n_jobs`: 0 or -1 = every core this process may run on."""
    if n_jobs in (0, -1):
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    if n_jobs < -1:
        raise ValueError(f"n_jobs must be >= 1, or 0 / -1 for every core; got {n_jobs}")
    return n_jobs


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def dense_index(keys: np.ndarray) -> Any:
    """The exact inner-product faiss index of the normalised keys (what `search_dense` asks)."""
    import faiss

    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(_normalise(keys))
    return index


class SparseIndex:
    """The sparse keys as the cosine search reads them: rows l2-normalised (as scikit-learn's
    `normalize` does), transposed to CSR (features x keys) once, for any k and any queries."""

    def __init__(self, keys: Any) -> None:
        from scipy import sparse
        from sklearn.preprocessing import normalize

        keys = sparse.csr_matrix(keys)
        self.dtype = np.float32 if keys.dtype == np.float32 else np.float64
        self.n_keys = keys.shape[0]
        self.keys_t = normalize(keys.astype(self.dtype, copy=False), copy=True).T.tocsr()


def sparse_index(keys: Any) -> SparseIndex:
    """The normalised, transposed sparse keys `search_sparse` reads."""
    return SparseIndex(keys)


def search_dense(
    queries: np.ndarray, keys: np.ndarray, k: int, index: Any = None, n_jobs: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, key indices), each (n, k), most similar first; exact cosine via faiss.
    `index`: `dense_index(keys)` when the caller keeps one. faiss runs on OpenMP threads, by
    default as many as the cores this process may use; `n_jobs` (as `neighbours.n_jobs`) sets
    them for this search only."""
    import faiss

    index = index if index is not None else dense_index(keys)
    before = faiss.omp_get_max_threads()
    threads = resolve_n_jobs(n_jobs) if n_jobs is not None else before
    if threads != before:
        faiss.omp_set_num_threads(threads)
    try:
        sims, idx = index.search(_normalise(queries), k)
    finally:
        if threads != before:
            faiss.omp_set_num_threads(before)
    return sims.astype(np.float64), idx


def _block_rows(n_keys: int, itemsize: int) -> int:
    """Queries per block: its similarities and argpartition indices fit SEARCH_BLOCK_BYTES."""
    return max(1, SEARCH_BLOCK_BYTES // (max(n_keys, 1) * (itemsize + 8)))


def _top_k(queries: Any, keys_t: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, key indices) of one block of queries, as scikit-learn's brute-force cosine
    `kneighbors` computes them: `cosine_distances` then `_kneighbors_reduce_func`."""
    from sklearn.utils.sparsefuncs import sparse_matmul_to_dense
    from sklearn.utils.sparsefuncs_fast import inplace_csr_row_normalize_l2

    # `normalize(queries, copy=True)` without its input checks (a served row paid more for
    # them than for the product): the CSR float rows `search_sparse` hands over, copied and
    # normalised by the same routine.
    queries = queries.copy()
    inplace_csr_row_normalize_l2(queries)
    distance = sparse_matmul_to_dense(queries, keys_t)
    distance *= -1
    distance += 1
    np.clip(distance, 0.0, 2.0, out=distance)
    rows = np.arange(distance.shape[0])[:, None]
    found = np.argpartition(distance, k - 1, axis=1)[:, :k]
    found = found[rows, np.argsort(distance[rows, found])]
    return 1.0 - distance[rows, found], found


# What a forked worker searches: set once per worker by `_init_worker` (fork: inherited, not
# pickled), read by `_search_block`.
_WORKER: tuple[Any, Any, int] | None = None


def _init_worker(queries: Any, keys_t: Any, k: int) -> None:
    global _WORKER
    _WORKER = (queries, keys_t, k)


def _search_block(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER is not None, "the sparse search worker was not initialised"
    queries, keys_t, k = _WORKER
    return _top_k(queries[bounds[0] : bounds[1]], keys_t, k)


def search_sparse(
    queries: Any, keys: Any, k: int, index: SparseIndex | None = None, n_jobs: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, key indices), each (n, k), most similar first; exact cosine, brute
    force, equal to scikit-learn's `NearestNeighbors(metric="cosine", algorithm="brute")` (module
    docstring). `index`: `sparse_index(keys)` when the caller keeps one. `n_jobs` worker
    processes (0 or -1: every core) search blocks of queries at once; a search of fewer than
    PARALLEL_MIN_PAIRS pairs, or where fork is unavailable, runs in this process."""
    from scipy import sparse

    index = index if index is not None else sparse_index(keys)
    if not 1 <= k <= index.n_keys:
        raise ValueError(f"k = {k} neighbours asked of {index.n_keys} keys")
    dtype = np.float32 if index.dtype == np.float32 and queries.dtype == np.float32 else np.float64
    keys_t = index.keys_t.astype(dtype, copy=False)
    queries = sparse.csr_matrix(queries).astype(dtype, copy=False)
    n = queries.shape[0]
    step = _block_rows(index.n_keys, np.dtype(dtype).itemsize)
    workers = min(resolve_n_jobs(n_jobs), math.ceil(n / step))
    blocks = [(start, min(start + step, n)) for start in range(0, n, step)]
    if workers > 1 and n * index.n_keys >= PARALLEL_MIN_PAIRS and _can_fork():
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(queries, keys_t, k)
        ) as pool:
            # a few blocks per task: fewer round trips, still ~8 tasks a worker to even out
            results = list(pool.map(_search_block, blocks, chunksize=_chunksize(blocks, workers)))
    else:
        results = [_top_k(queries[start:stop], keys_t, k) for start, stop in blocks]
    if not results:
        return np.empty((0, k), dtype=dtype), np.empty((0, k), dtype=np.intp)
    return np.vstack([r[0] for r in results]), np.vstack([r[1] for r in results])


def _chunksize(blocks: list[tuple[int, int]], workers: int) -> int:
    return max(1, len(blocks) // (8 * workers))


def _can_fork() -> bool:
    """Whether worker processes can be forked here (not on Windows; not in a daemonic process,
    which may not have children)."""
    return (
        "fork" in multiprocessing.get_all_start_methods()
        and not multiprocessing.current_process().daemon
    )


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
