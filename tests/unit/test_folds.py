import numpy as np
import pandas as pd
import pytest

from pricefuse.data.folds import (
    _price_bins,
    assign_group_folds,
    fold_keys,
    group_ids,
    text_group_key,
)


def test_text_group_key_ignores_case_punctuation_spacing() -> None:
    keys = text_group_key(["Tea, 12 oz.", "tea   12 OZ", None, "Coffee"])
    assert keys[0] == keys[1] == "tea 12 oz"
    assert keys[2] == ""
    assert keys[3] != keys[0]


def test_group_ids_links_transitively_and_ignores_empty_keys() -> None:
    text = ["a", "a", "b", "c", "", "", "d"]
    image = ["", "x", "x", "", "", "", "y"]
    groups = group_ids(text, image)
    # rows 0-1 share text, 1-2 share an image: one group; empty keys link nothing
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[3], groups[4], groups[5], groups[6], groups[0]}) == 5
    assert groups.tolist()[:1] == [0]  # numbered in order of first appearance


def _duplicated_catalog(n: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    """Mostly distinct products; some rows relist an earlier name or reuse an earlier image."""
    rng = np.random.default_rng(seed)
    text_id = np.arange(n)
    image_id = np.arange(n)
    for i in range(1, n):
        if rng.random() < 0.15:
            text_id[i] = text_id[rng.integers(i)]
        if rng.random() < 0.1:
            image_id[i] = image_id[rng.integers(i)]
    text = [f"product {t}" for t in text_id]
    image = ["" if rng.random() < 0.2 else f"img{m}.jpg" for m in image_id]
    price = rng.normal(2.7, 1.0, size=n)
    return text, image, price


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_never_straddle_folds(seed: int) -> None:
    text, image, price = _duplicated_catalog(600, seed)
    folds = assign_group_folds(text, image, price, n_folds=5, seed=seed)
    frame = pd.DataFrame({"text": text, "image": image, "fold": folds})
    assert frame["text"].duplicated().sum() > 50  # the case under test: many duplicates
    assert frame.loc[frame.image != "", "image"].duplicated().sum() > 20
    assert frame.groupby("text")["fold"].nunique().max() == 1
    assert frame[frame.image != ""].groupby("image")["fold"].nunique().max() == 1
    assert set(folds) == set(range(5))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 0.1 * len(folds)


def test_singleton_groups_are_stratified_on_price() -> None:
    rng = np.random.default_rng(3)
    n, k = 1000, 5
    price = rng.lognormal(2.5, 1.0, size=n)
    folds = assign_group_folds([f"t{i}" for i in range(n)], [""] * n, np.log1p(price), k, seed=7)
    assert np.bincount(folds).tolist() == [200] * 5
    bins = _price_bins(np.log1p(price), k)
    per_bin = pd.crosstab(bins, folds).to_numpy()
    assert (per_bin.max(axis=1) - per_bin.min(axis=1)).max() <= 1
    means = pd.Series(np.log1p(price)).groupby(folds).mean()
    assert means.max() - means.min() < 0.05


def test_folds_are_deterministic_per_seed() -> None:
    text, image, price = _duplicated_catalog(300, 5)
    first = assign_group_folds(text, image, price, 4, seed=11)
    assert np.array_equal(first, assign_group_folds(text, image, price, 4, seed=11))
    assert not np.array_equal(first, assign_group_folds(text, image, price, 4, seed=12))


def test_fold_assignment_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        assign_group_folds(["a", "b"], ["", ""], [1.0, 2.0], 1, 0)
    with pytest.raises(ValueError, match="cannot fill"):
        assign_group_folds(["a", "a", "b"], ["", "", ""], [1.0, 2.0, 3.0], 3, 0)
    with pytest.raises(ValueError, match="non-finite"):
        assign_group_folds(["a", "b"], ["", ""], [1.0, np.nan], 2, 0)
    with pytest.raises(ValueError, match="differ in length"):
        group_ids(["a", "b"], [""])


def test_fold_keys_prefer_name_and_cached_path() -> None:
    parsed = pd.DataFrame(
        {
            "item_name": ["Tea, 12 oz", "", "Coffee"],
            "text": ["Tea, 12 oz\nbullet", "Only: a description", "Coffee"],
            "image_link": ["http://x/a.jpg", " ", "http://x/b.jpg"],
            "image_path": ["data/images/files/a.jpg", "", ""],
        }
    )
    text_keys, image_keys = fold_keys(parsed)
    assert text_keys == ["tea 12 oz", "only a description", "coffee"]
    assert image_keys == ["data/images/files/a.jpg", "", "http://x/b.jpg"]
