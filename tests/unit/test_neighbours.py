"""Neighbour-price features: exact statistics, no fold leaks, save/load, missing images."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pricefuse.models.neighbours import search
from pricefuse.models.neighbours.predictor import NeighbourIndex, knn_estimate
from pricefuse.models.neighbours.search import (
    NeighbourRows,
    feature_names,
    neighbour_stats,
    resolve_n_jobs,
    search_dense,
    search_sparse,
    sparse_index,
)
from pricefuse.models.neighbours.training import oof_features
from tests.support import project_params

BRANDS = ["acme", "zenith", "orbit", "delta", "nova", "pico", "quartz", "ridge"]
PRODUCTS = ["green tea", "coffee beans", "olive oil", "dark chocolate", "hand soap", "rice"]


def rows(n: int, seed: int = 0) -> tuple[NeighbourRows, np.ndarray, np.ndarray]:
    """Parsed rows whose price follows product and size, aligned embeddings, and 5 folds."""
    rng = np.random.default_rng(seed)
    product = rng.integers(0, len(PRODUCTS), n)
    brand = rng.integers(0, len(BRANDS), n)
    value = rng.choice([4.0, 8.0, 16.0, 32.0], n)
    names = [
        f"{BRANDS[b]} {PRODUCTS[p]} {v:g} ounce"
        for b, p, v in zip(brand, product, value, strict=True)
    ]
    parsed = pd.DataFrame(
        {
            "item_name": names,
            "value": value,
            "unit": "ounce",
            "pack": 1,
            "text": [
                f"{name}. Bullet: made by {BRANDS[b]}."
                for name, b in zip(names, brand, strict=True)
            ],
        }
    )
    log_price = np.log1p((1 + product) * np.sqrt(value)) + rng.normal(0, 0.05, n)
    centroids = rng.normal(size=(len(PRODUCTS), 16))
    text = centroids[product] + rng.normal(0, 0.3, (n, 16))
    image = centroids[product][:, :8] + rng.normal(0, 0.3, (n, 8))
    mask = rng.random(n) < 0.4
    image[~mask] = 0.0
    data = NeighbourRows(parsed, text.astype(np.float32), image.astype(np.float32), mask)
    return data, log_price, np.arange(n) % 5


CFG = replace(project_params().neighbours, k=5)


def test_stats_weights_median_spread_and_band() -> None:
    sims = np.array([[1.0, 0.5, 0.0]])
    values = np.array([[1.0, 2.0, 10.0]])
    out = neighbour_stats(sims, values, decay=1.0, band=0.0)
    w = np.exp(-1.0 * (1 - sims[0]))
    mean = (w * values[0]).sum() / w.sum()
    np.testing.assert_allclose(out[0, 0], mean)
    assert out[0, 1] == 2.0  # median
    np.testing.assert_allclose(out[0, 2], np.sqrt((w * (values[0] - mean) ** 2).sum() / w.sum()))
    assert out[0, 3] == 1.0 and out[0, 4] == 1.0  # closest: similarity and value
    banded = neighbour_stats(sims, values, decay=1.0, band=2.0)  # 10 is 8 from the median 2
    np.testing.assert_allclose(banded[0, 0], (w[:2] * values[0, :2]).sum() / w[:2].sum())


def test_oof_features_of_a_row_never_depend_on_its_own_fold() -> None:
    data, y, folds = rows(300)
    r = int(np.flatnonzero(folds == 0)[0])
    baseline = oof_features(CFG, data, y, folds).iloc[r]

    def perturbed(rows_to_change: np.ndarray) -> pd.Series:
        parsed = data.parsed.copy()
        parsed.loc[rows_to_change, "item_name"] = "zenith green tea 4 ounce"
        parsed.loc[rows_to_change, "text"] = "zenith green tea 4 ounce"
        text, image = data.text.copy(), data.image.copy()
        text[rows_to_change] = text[r]
        image[rows_to_change] = image[r]
        values = y.copy()
        values[rows_to_change] = 9.0
        changed = NeighbourRows(parsed, text, image, data.image_mask)
        return oof_features(CFG, changed, values, folds).iloc[r]

    same_fold = np.setdiff1d(np.flatnonzero(folds == 0), [r])
    pd.testing.assert_series_equal(perturbed(same_fold), baseline)
    # the same change in another fold moves the row's features: the check can fail
    moved = perturbed(np.flatnonzero(folds == 1))
    assert not np.allclose(moved.to_numpy(), baseline.to_numpy(), equal_nan=True)


def test_a_duplicate_in_another_fold_is_the_closest_neighbour() -> None:
    data, y, folds = rows(200)
    parsed = data.parsed.copy()
    same = ["item_name", "text", "value"]
    parsed.loc[1, same] = parsed.loc[0, same].to_numpy()
    text = data.text.copy()
    text[1] = text[0]
    values = y.copy()
    values[1] = 7.5
    features = oof_features(
        CFG, NeighbourRows(parsed, text, data.image, data.image_mask), values, folds
    )
    for space in ("tfidf_name", "tfidf_text", "text_embedding"):
        assert features.loc[0, f"nbr_{space}_top1_sim"] == pytest.approx(1.0, abs=1e-5)
        assert features.loc[0, f"nbr_{space}_top1"] == pytest.approx(7.5)


def test_image_features_only_for_rows_with_an_image_and_knn_beats_the_mean() -> None:
    data, y, folds = rows(400)
    features = oof_features(CFG, data, y, folds)
    image = features["nbr_image_mean"].to_numpy()
    assert np.isnan(image[~data.image_mask]).all()
    assert np.isfinite(image[data.image_mask]).all()
    estimate = knn_estimate(features, ("tfidf_name", "tfidf_text"))
    assert np.abs(estimate - y).mean() < 0.5 * np.abs(y.mean() - y).mean()
    with pytest.raises(ValueError, match="spaces"):
        knn_estimate(features.drop(columns=["nbr_tfidf_text_mean"]), ("tfidf_text",))


def test_index_save_load_gives_identical_features_without_pickle(tmp_path: Path) -> None:
    data, y, _ = rows(150)
    query, _, _ = rows(40, seed=1)
    index = NeighbourIndex.fit(CFG, data, y)
    before = index.features(query)
    assert list(before.columns) == feature_names(CFG.spaces)
    index.save(tmp_path)
    assert {p.suffix for p in tmp_path.iterdir()} <= {".json", ".npy", ".npz"}
    after = NeighbourIndex.load(tmp_path).features(query)
    np.testing.assert_allclose(after.to_numpy(), before.to_numpy(), rtol=1e-6)


def test_an_index_saved_before_n_jobs_existed_still_loads(tmp_path: Path) -> None:
    """n_jobs changes the speed, not the features: a manifest without it loads (every core)."""
    import json

    data, y, _ = rows(150)
    query, _, _ = rows(40, seed=1)
    index = NeighbourIndex.fit(replace(CFG, n_jobs=1), data, y)
    manifest = index.save(tmp_path)
    raw = json.loads(manifest.read_text())
    del raw["config"]["n_jobs"]
    manifest.write_text(json.dumps(raw))
    loaded = NeighbourIndex.load(tmp_path)
    assert loaded.cfg.n_jobs == 0
    np.testing.assert_array_equal(
        loaded.features(query).to_numpy(), index.features(query).to_numpy()
    )


def test_a_kept_search_index_answers_as_a_fresh_search() -> None:
    """The served model keeps each space's search index across requests (no rebuild per
    request); a second query, and one with another k, must equal a search built from scratch."""
    data, y, _ = rows(150)
    index = NeighbourIndex.fit(CFG, data, y)
    first, _, _ = rows(30, seed=1)
    index.features(first)  # builds and keeps the indexes
    query, _, _ = rows(20, seed=2)
    queries = index.spaces["tfidf_text"].vectorizer.transform(query.parsed["text"])
    for k in (5, 3):
        kept = index.spaces["tfidf_text"].search(queries, k)
        fresh = search_sparse(queries, index.spaces["tfidf_text"].keys, k)
        np.testing.assert_array_equal(kept[1], fresh[1])
        np.testing.assert_array_equal(kept[0], fresh[0])
    space = index.spaces["text_embedding"]
    np.testing.assert_array_equal(
        space.search(query.text, 5)[0], search_dense(query.text, space.keys, 5)[0]
    )
    features = index.features(query)
    rebuilt = NeighbourIndex.fit(CFG, data, y).features(query)
    np.testing.assert_array_equal(features.to_numpy(), rebuilt.to_numpy())


def sparse_rows(n: int, rng: np.random.Generator) -> object:
    """TF-IDF-like rows over 300 terms with many exact ties: few terms a row, weights from
    {0.5, 1, 2}, every 7th row empty (no term at all) and every 5th a duplicate of another."""
    from scipy import sparse

    dense = np.zeros((n, 300), dtype=np.float32)
    for i in range(n):
        terms = rng.choice(300, size=rng.integers(1, 6), replace=False)
        dense[i, terms] = rng.choice([0.5, 1.0, 2.0], size=len(terms))
    dense[::7] = 0.0
    dense[::5] = dense[rng.integers(0, n, size=len(dense[::5]))]
    return sparse.csr_matrix(dense)


def test_parallel_sparse_search_equals_scikit_learns_brute_force(monkeypatch) -> None:
    """The parallel search returns scikit-learn's neighbours and similarities exactly, ties among
    duplicates and empty rows included, however the queries are split into blocks."""
    from scipy import sparse
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(7)
    keys, queries = sparse_rows(3000, rng), sparse_rows(2000, rng)
    queries = sparse.vstack([queries, keys[:50]]).tocsr()  # queries equal to keys
    k = 10
    distance, expected = (
        NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute")
        .fit(keys)
        .kneighbors(queries)
    )
    pools = []

    class CountingPool(search.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs) -> None:
            pools.append(args[0] if args else kwargs["max_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(search, "ProcessPoolExecutor", CountingPool)
    monkeypatch.setattr(search, "PARALLEL_MIN_PAIRS", 0)
    monkeypatch.setattr(search, "SEARCH_BLOCK_BYTES", 3000 * 12 * 97)  # 97 queries a block
    index = sparse_index(keys)
    for n_jobs in (1, 3):
        sims, idx = search_sparse(queries, keys, k, index, n_jobs=n_jobs)
        np.testing.assert_array_equal(idx, expected)
        np.testing.assert_array_equal(sims, 1.0 - distance)
    assert pools == [3]  # n_jobs=3 did run in worker processes
    # the ties are real: duplicated keys and empty rows give equal similarities within a row
    assert (np.diff(sims, axis=1) == 0).any()
    empty = np.flatnonzero(queries.getnnz(axis=1) == 0)
    assert len(empty) and (sims[empty] == 0).all()


def test_n_jobs_zero_or_minus_one_is_every_core() -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    assert resolve_n_jobs(0) == resolve_n_jobs(-1) == cores
    assert resolve_n_jobs(3) == 3
    with pytest.raises(ValueError, match="n_jobs"):
        resolve_n_jobs(-2)


def test_knn_estimate_is_the_nan_skipping_mean_of_the_member_spaces() -> None:
    """The knn member (numpy) equals pandas' row mean that skips missing spaces, from a table or
    from arrays by name, and a row without any estimate is an error."""
    spaces = ("tfidf_name", "tfidf_text", "image")
    columns = [f"nbr_{space}_mean" for space in spaces]
    values = np.array([[1.0, 2.0, 4.0], [np.nan, 3.0, np.nan], [0.1, 0.7, np.nan]])
    frame = pd.DataFrame(values, columns=columns)
    expected = frame.mean(axis=1, skipna=True).to_numpy()
    np.testing.assert_array_equal(knn_estimate(frame, spaces), expected)
    arrays = {name: frame[name].to_numpy() for name in columns}
    np.testing.assert_array_equal(knn_estimate(arrays, spaces), expected)
    frame.iloc[1, 1] = np.nan
    with pytest.raises(ValueError, match="no neighbour estimate"):
        knn_estimate(frame, spaces)
    with pytest.raises(ValueError, match="lack"):
        knn_estimate(frame, ("text_embedding",))


def test_augment_adds_the_features_as_columns_and_as_arrays() -> None:
    """The served path (augment, then the member from the batch's arrays) gives the table that
    `features` gives and the member `knn_estimate` computes from it."""
    from pricefuse.pipeline.members import MemberBatch

    data, y, _ = rows(200)
    index = NeighbourIndex.fit(CFG, data, y)
    query, _, _ = rows(7, seed=4)
    batch = MemberBatch(query.parsed, query.text, query.image, query.image_mask)
    augmented = index.augment(batch)
    expected = index.features(query)
    pd.testing.assert_frame_equal(augmented.parsed[expected.columns], expected)
    assert set(augmented.arrays) == set(expected.columns)
    assert list(augmented.base.columns) == list(query.parsed.columns)  # nothing joined there
    for name in expected.columns:
        np.testing.assert_array_equal(augmented.arrays[name], expected[name].to_numpy())
    member = index.predict_members(augmented)["knn"]
    np.testing.assert_array_equal(member, knn_estimate(expected, CFG.member_spaces))
    np.testing.assert_array_equal(index.predict_members(batch)["knn"], member)
