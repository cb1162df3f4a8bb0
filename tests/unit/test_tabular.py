"""Tabular features: vocabularies, unknown categories, image PCA on image rows only, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pricefuse.features.tabular import (
    KEYWORDS,
    EmbeddingCompressor,
    Embeddings,
    TabularFeaturizer,
    parsed_features,
)


def parsed_frame(n: int, seed: int = 0) -> pd.DataFrame:
    """A train table as preprocess writes it (the columns the GBDT code reads), whose log_price
    follows unit, value and pack with a little noise, and folds 0..4 (shared by the GBDT tests).
    """
    rng = np.random.default_rng(seed)
    units = rng.choice(["ounce", "fl_oz", "count"], size=n)
    kinds = np.where(units == "ounce", "mass", np.where(units == "fl_oz", "volume", "count"))
    value = rng.uniform(1, 50, size=n).round(1)
    pack = rng.integers(1, 7, size=n)
    unit_price = pd.Series(units).map({"ounce": 0.8, "fl_oz": 0.3, "count": 2.5}).to_numpy()
    price = unit_price * (value * pack) ** 0.8 * np.exp(rng.normal(0, 0.05, size=n))
    return pd.DataFrame(
        {
            "sample_id": np.arange(n) + 1000,
            "fold": np.arange(n) % 5,
            "log_price": np.log1p(price),
            "item_name": [
                f"Organic Tea {v} Ounce (Pack of {p})" for v, p in zip(value, pack, strict=True)
            ],
            "value": value,
            "unit": units,
            "quantity": value * 28.35,
            "quantity_kind": kinds,
            "log_quantity": np.log1p(value * 28.35),
            "pack": pack,
            "n_bullets": rng.integers(0, 6, size=n),
            "text_len": rng.integers(50, 900, size=n),
            "value_missing": np.zeros(n, dtype=np.int8),
            "unit_missing": np.zeros(n, dtype=np.int8),
        }
    )


def embeddings(n: int, seed: int = 0, image_rate: float = 0.5) -> Embeddings:
    rng = np.random.default_rng(seed)
    mask = rng.random(n) < image_rate
    image = rng.normal(size=(n, 12)).astype(np.float32) + 3.0
    image[~mask] = 0.0  # the placeholder the encoder writes for rows without an image
    return Embeddings(rng.normal(size=(n, 20)).astype(np.float32), image, mask)


def fitted(n: int = 60, text_pca: int = 4, image_pca: int = 3) -> TabularFeaturizer:
    return TabularFeaturizer(text_pca, image_pca, seed=7).fit(parsed_frame(n), embeddings(n))


def column(featurizer: TabularFeaturizer, values: np.ndarray, name: str) -> np.ndarray:
    return values[:, featurizer.names.index(name)]


def test_name_tokens_keywords_and_derived_quantities() -> None:
    frame = parsed_frame(3)
    frame["item_name"] = ["Premium Gift Set of 2, 1,000 Count", "plain water", ""]
    frame["quantity"] = [120.0, 10.0, 5.0]
    frame["pack"] = [4, 1, 1]
    out = parsed_features(frame)
    np.testing.assert_allclose(out["name_log_max_number"], [np.log1p(1000.0), np.nan, np.nan])
    np.testing.assert_array_equal(out["name_n_numbers"], [2, 0, 0])
    np.testing.assert_array_equal(out["kw_premium"], [1, 0, 0])
    np.testing.assert_array_equal(out["kw_gift"], [1, 0, 0])
    np.testing.assert_array_equal(out["kw_set"], [1, 0, 0])
    np.testing.assert_array_equal(out["kw_organic"], [0, 0, 0])
    np.testing.assert_allclose(out["log_quantity_per_pack"], np.log1p([30.0, 10.0, 5.0]))
    np.testing.assert_allclose(out["log_quantity_times_pack"], np.log1p([480.0, 10.0, 5.0]))
    assert {f"kw_{k}" for k in KEYWORDS} <= set(out.columns)


def test_missing_parsed_column_is_named() -> None:
    with pytest.raises(ValueError, match="pack"):
        parsed_features(parsed_frame(4).drop(columns=["pack"]))


def test_vocabulary_is_fit_on_train_and_unknown_unit_becomes_missing() -> None:
    featurizer = fitted()
    assert featurizer.vocabulary["unit"] == ("count", "fl_oz", "ounce")
    rows = parsed_frame(4, seed=1)
    rows["unit"] = ["ounce", "gallon", "count", None]
    x = featurizer.transform(rows, embeddings(4, seed=1))
    codes = column(featurizer, x.values, "unit")
    np.testing.assert_array_equal(codes[[0, 2]], [2.0, 0.0])
    assert np.isnan(codes[1]) and np.isnan(codes[3])
    assert featurizer.names.index("unit") in x.categorical
    assert featurizer.names.index("quantity_kind") in x.categorical


def test_image_pca_is_fit_on_image_rows_and_missing_images_are_nan() -> None:
    n = 80
    emb = embeddings(n)
    featurizer = TabularFeaturizer(4, 3, seed=7).fit(parsed_frame(n), emb)
    pca = featurizer.compressor.image_pca
    assert pca is not None
    # The mean is that of image rows only: zero placeholders would pull it towards 0.
    np.testing.assert_allclose(pca.mean, emb.image[emb.image_mask].mean(axis=0), rtol=1e-5)
    x = featurizer.transform(parsed_frame(n), emb)
    image_cols = [i for i, name in enumerate(x.names) if name.startswith("image_pc")]
    assert len(image_cols) == 3
    block = x.values[:, image_cols]
    assert np.isnan(block[~emb.image_mask]).all()
    assert np.isfinite(block[emb.image_mask]).all()
    np.testing.assert_array_equal(column(featurizer, x.values, "has_image"), emb.image_mask)


def test_without_any_image_there_are_no_image_components() -> None:
    n = 30
    emb = embeddings(n, image_rate=0.0)
    compressor = EmbeddingCompressor(5, 3, seed=0).fit(emb)
    assert compressor.names == tuple(f"text_pc{i}" for i in range(5))
    assert compressor.transform(emb).shape == (n, 5)


def test_components_are_capped_by_the_data() -> None:
    emb = embeddings(6, image_rate=1.0)
    compressor = EmbeddingCompressor(50, 50, seed=0).fit(emb)
    assert compressor.transform(emb).shape == (6, 12)  # 6 text + 6 image components (6 rows)


def test_transform_is_deterministic_and_survives_save_load(tmp_path: Path) -> None:
    first, second = fitted(), fitted()
    rows, emb = parsed_frame(25, seed=3), embeddings(25, seed=3)
    a = first.transform(rows, emb)
    np.testing.assert_array_equal(a.values, second.transform(rows, emb).values)
    loaded = TabularFeaturizer.load(first.save(tmp_path / "f"))
    b = loaded.transform(rows, emb)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.names == b.names and a.categorical == b.categorical
    assert a.values.dtype == np.float32 and a.values.shape == (25, len(a.names))


def test_saved_state_is_json_and_npy_not_pickle(tmp_path: Path) -> None:
    """What a fold featurizer fitted (vocabularies, PCA bases, stacked columns) survives a
    round trip through files that load without pickle, including unseen units and no images."""
    frame, emb = parsed_frame(50), embeddings(50, image_rate=0.0)
    frame["member_linear"] = np.linspace(1, 2, 50)
    featurizer = TabularFeaturizer(4, 3, seed=2).fit(frame, emb)
    directory = featurizer.save(tmp_path / "featurizer_0")
    assert sorted(p.name for p in directory.iterdir()) == [
        "featurizer.json",
        "text_pca_components.npy",
        "text_pca_mean.npy",
    ]
    for array in directory.glob("*.npy"):
        np.load(array, allow_pickle=False)
    loaded = TabularFeaturizer.load(directory)
    assert loaded.vocabulary == featurizer.vocabulary
    assert loaded.extra_columns == ("member_linear",) and loaded.names == featurizer.names
    assert loaded.compressor.image_pca is None
    rows = parsed_frame(12, seed=8)
    rows.loc[0, "unit"] = "gallon"
    rows["member_linear"] = 1.5
    rows_emb = embeddings(12, seed=8)
    np.testing.assert_array_equal(
        loaded.transform(rows, rows_emb).values, featurizer.transform(rows, rows_emb).values
    )
    with pytest.raises(FileNotFoundError, match="not a saved TabularFeaturizer"):
        TabularFeaturizer.load(tmp_path)


def test_rows_must_align_with_embeddings() -> None:
    featurizer = fitted()
    with pytest.raises(ValueError, match="aligned"):
        featurizer.transform(parsed_frame(5), embeddings(6))


def test_neighbour_and_stacked_member_columns_are_taken_as_they_are() -> None:
    frame, emb = parsed_frame(40), embeddings(40)
    frame["nbr_tfidf_name_mean"] = np.linspace(1, 2, 40)
    frame["member_linear"] = np.linspace(3, 4, 40)
    frame["unrelated"] = 7.0
    featurizer = TabularFeaturizer(2, 1, seed=0).fit(frame, emb)
    assert featurizer.extra_columns == ("nbr_tfidf_name_mean", "member_linear")
    assert "unrelated" not in featurizer.names
    values = featurizer.transform(frame, emb).values
    np.testing.assert_allclose(column(featurizer, values, "member_linear"), frame["member_linear"])
    lacking = featurizer.transform(frame.drop(columns=["member_linear"]), emb).values
    assert np.isnan(column(featurizer, lacking, "member_linear")).all()


def test_a_number_too_long_for_a_float_is_counted_but_not_the_largest() -> None:
    frame = parsed_frame(2)
    frame["item_name"] = ["Code " + "9" * 400 + " tea 12 oz", "9" * 400]
    features = parsed_features(frame)
    assert features["name_n_numbers"].tolist() == [2.0, 1.0]
    assert features.loc[0, "name_log_max_number"] == pytest.approx(np.log1p(12.0))
    assert np.isnan(features.loc[1, "name_log_max_number"])  # missing, as with no number
    assert not np.isinf(features.to_numpy(np.float32)).any()


def test_shared_columns_given_as_arrays_transform_as_read_from_the_table() -> None:
    """A caller that already holds the `nbr_*`/`member_*` columns as arrays (the served model's
    batch) gets the matrix the table gives, and featurizers sharing one cache (the folds) each
    get their own result."""
    frame, emb = parsed_frame(40), embeddings(40)
    frame["nbr_tfidf_name_mean"] = np.linspace(1, 3, 40)
    frame["member_linear"] = np.linspace(2, 4, 40)
    frame.loc[3, "member_linear"] = np.nan
    first = TabularFeaturizer(4, 3, seed=7).fit(frame, emb)
    second = TabularFeaturizer(2, 1, seed=3).fit(frame.iloc[:30], emb.take(np.arange(30)))
    query = frame.iloc[5:12].reset_index(drop=True)
    query.loc[0, "unit"] = "unseen_unit"
    query_emb = emb.take(np.arange(5, 12))
    alone = [f.transform(query, query_emb).values for f in (first, second)]
    arrays = {c: query[c].to_numpy() for c in ("nbr_tfidf_name_mean", "member_linear")}
    shared: dict = dict(arrays)
    together = [f.transform(query, query_emb, shared).values for f in (first, second)]
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)
