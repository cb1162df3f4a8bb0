import numpy as np
import pytest

from pricefuse.core.metrics import smape, smape_by_bucket, smape_from_log


def test_smape_known_values():
    assert smape(np.array([100.0]), np.array([100.0])) == 0.0
    # |110-100| / 105 = 0.0952...
    assert smape(np.array([100.0]), np.array([110.0])) == pytest.approx(100 * 10 / 105)
    # the metric's maximum: one side zero
    assert smape(np.array([0.0, 5.0]), np.array([3.0, 5.0])) == pytest.approx(100.0)


def test_smape_symmetric_and_zero_pairs():
    a, f = np.array([1.0, 2.0, 0.0]), np.array([2.0, 1.0, 0.0])
    assert smape(a, f) == pytest.approx(smape(f, a))
    assert smape(a, f) == pytest.approx(100 * (2 * (1 / 1.5)) / 3)


def test_smape_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        smape(np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        smape(np.array([1.0]), np.array([np.nan]))
    with pytest.raises(ValueError, match="no values"):
        smape(np.array([]), np.array([]))


def test_smape_from_log_matches_prices():
    prices = np.array([3.0, 10.0, 250.0])
    preds = np.array([4.0, 9.0, 200.0])
    assert smape_from_log(np.log1p(prices), np.log1p(preds)) == pytest.approx(smape(prices, preds))


def test_smape_by_bucket():
    report = smape_by_bucket(
        np.array([1.0, 1.0, 2.0]), np.array([1.0, 3.0, 2.0]), np.array(["a", "a", "b"])
    )
    assert list(report["bucket"]) == ["a", "b"]
    assert list(report["n"]) == [2, 1]
    assert report["smape"].iloc[1] == 0.0
