"""The hand features from the item name: brand and product type, their target encodings fitted
without the encoded row's own price, and the featurizer columns they become."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_tabular import embeddings, parsed_frame

from pricefuse.features.product_terms import (
    OTHER_TYPE,
    brand_of,
    brand_pair_of,
    product_type_of,
)
from pricefuse.features.tabular import HAND_COLUMNS, TYPE_CODE, TabularFeaturizer
from pricefuse.features.target_encoding import SMOOTHING, Encoding, out_of_group


@pytest.mark.parametrize(
    ("name", "brand", "pair"),
    [
        ("La Victoria Green Taco Sauce Mild, 12 Ounce (Pack of 6)", "la", "la victoria"),
        ("Member's Mark Member's Mark, Basil, 6.25 oz", "member", "member mark"),
        ("The Original Butter Cookies by Salerno, 8 Ounce", "salerno", "the original"),
        ("Organic Vinegar; Apple Cider", "vinegar", "organic vinegar"),
        ("12 oz", "oz", "oz"),
        ("", "", ""),
    ],
)
def test_brand_is_the_leading_word_or_the_by_name(name: str, brand: str, pair: str) -> None:
    assert brand_of(name) == brand
    assert brand_pair_of(name) == pair


@pytest.mark.parametrize(
    ("name", "product_type"),
    [
        ("Smuckers Natural Peanut Butter Chunky, 16 OZ", "spread"),
        ("Starbucks Medium Roast K-Cup Coffee Pods", "coffee"),
        ("Twinings Chamomile Herbal Tea Bags", "tea"),
        ("KiZE Bars, Cookie Dough Flavor, High Protein", "cookie"),
        ("Goya Foods Sazonador Total Seasoning, 30 Ounce", "seasoning"),
        ("Acme Widget Deluxe", OTHER_TYPE),
    ],
)
def test_product_type_is_the_first_matching_pattern(name: str, product_type: str) -> None:
    assert product_type_of(name) == product_type


def test_encoding_shrinks_rare_keys_towards_the_prior() -> None:
    keys = ["a"] * 2 + ["b"] * 200 + ["c"] * 2
    y = np.array([10.0] * 2 + [1.0] * 200 + [1.0] * 2)
    enc = Encoding.fit(keys, y)
    prior = y.mean()
    assert enc.prior == pytest.approx(prior)
    assert enc.transform(["a"])[0] == pytest.approx((20.0 + SMOOTHING * prior) / (2 + SMOOTHING))
    assert enc.transform(["b"])[0] == pytest.approx((200 + SMOOTHING * prior) / (200 + SMOOTHING))
    assert enc.transform(["never seen", ""]).tolist() == [prior, prior]
    assert enc.log_counts(["b", "z"]).tolist() == [pytest.approx(np.log1p(200)), 0.0]
    again = Encoding.from_state(enc.state())
    assert again.transform(keys).tolist() == enc.transform(keys).tolist()


def test_out_of_group_never_reads_the_row_own_group() -> None:
    """Each group has keys of its own: without its group a row's key is unseen, so every row
    gets the other groups' prior - and a leaking encoder (fitted on all rows) would not."""
    groups = np.repeat(np.arange(4), 5)
    keys = [f"key{g}" for g in groups]
    y = groups.astype(float) * 3.0
    encoded, counts = out_of_group(keys, y, groups)
    for g in range(4):
        rows = groups == g
        assert np.allclose(encoded[rows], y[~rows].mean())
        assert (counts[rows] == 0).all()
    assert not np.allclose(Encoding.fit(keys, y).transform(keys), encoded)


def test_one_group_gets_the_prior() -> None:
    encoded, counts = out_of_group(["a", "a"], np.array([1.0, 3.0]), np.zeros(2))
    assert encoded.tolist() == [2.0, 2.0] and counts.tolist() == [0.0, 0.0]


def _branded(n: int, seed: int = 0) -> pd.DataFrame:
    frame = parsed_frame(n, seed)
    brands = np.array(["Acme", "Zenith", "Lumo", "Brio"])[np.arange(n) % 4]
    frame["item_name"] = [
        f"{b} Coffee {v} Ounce" for b, v in zip(brands, frame["value"], strict=True)
    ]
    frame["log_price"] += np.where(brands == "Zenith", 1.0, 0.0)
    return frame


def test_featurizer_adds_hand_columns_encoded_out_of_fold_for_its_fit_rows(tmp_path: Path):
    frame, emb = _branded(200), embeddings(200)
    featurizer = TabularFeaturizer(3, 2, seed=0).fit(frame, emb)
    assert set(HAND_COLUMNS) <= set(featurizer.names)
    assert featurizer.names.index(TYPE_CODE) in featurizer.categorical
    served = featurizer.transform(frame, emb).frame()
    trained = featurizer.transform_fit_rows(frame, emb).frame()
    # Served/held rows read the table fitted on every fit row; the fit rows their out-of-fold one
    full = Encoding.fit([brand_of(n) for n in frame["item_name"]], frame["log_price"].to_numpy())
    assert np.allclose(
        served["brand_te"], full.transform([brand_of(n) for n in frame["item_name"]])
    )
    assert not np.allclose(trained["brand_te"], served["brand_te"])
    others = [c for c in served.columns if c not in HAND_COLUMNS]
    pd.testing.assert_frame_equal(trained[others], served[others])
    # Zenith's prices are e (1.0 in log) higher: its encoding says so
    zenith = frame["item_name"].str.startswith("Zenith").to_numpy()
    assert served["brand_te"][zenith].mean() > served["brand_te"][~zenith].mean() + 0.5
    # and the saved featurizer transforms exactly as the fitted one
    featurizer.save(tmp_path / "f")
    loaded = TabularFeaturizer.load(tmp_path / "f")
    np.testing.assert_array_equal(
        loaded.transform(frame, emb).values, featurizer.transform(frame, emb).values
    )


def test_a_featurizer_saved_before_the_hand_features_still_loads(tmp_path: Path) -> None:
    import json

    frame, emb = parsed_frame(100), embeddings(100)
    featurizer = TabularFeaturizer(3, 2, seed=0).fit(frame, emb)
    featurizer.save(tmp_path / "f")
    state = json.loads((tmp_path / "f" / "featurizer.json").read_text())
    state.pop("encodings")
    state["names"] = [n for n in state["names"] if n not in HAND_COLUMNS]
    state["vocabulary"].pop(TYPE_CODE)
    (tmp_path / "f" / "featurizer.json").write_text(json.dumps(state))
    old = TabularFeaturizer.load(tmp_path / "f")
    assert old.encodings is None
    matrix = old.transform(frame, emb)
    assert matrix.values.shape == (100, len(state["names"]))
