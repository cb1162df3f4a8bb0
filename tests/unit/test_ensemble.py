import numpy as np
import pytest

from pricefuse.metrics import smape
from pricefuse.models.ensemble import (
    EnsembleState,
    fit_blend_weights,
    fit_knn_alpha,
    knn_mean,
    to_price,
)


def _members(rng, n=600):
    y = rng.normal(3.0, 1.0, n)
    good = y + rng.normal(0, 0.15, n)
    noisy = y + rng.normal(0, 0.8, n)
    biased = y + 0.5 + rng.normal(0, 0.3, n)
    return y, np.column_stack([good, noisy, biased])


def test_fitted_weights_beat_equal_and_hand_blends():
    rng = np.random.default_rng(0)
    y, x = _members(rng)
    weights = fit_blend_weights(x, y, ["good", "noisy", "biased"], starts=[[0.2, 0.4, 0.4]])
    assert sum(weights.weights) == pytest.approx(1.0)
    assert min(weights.weights) >= 0
    assert weights.weights[0] > 0.6, weights
    fitted = smape(np.expm1(y), to_price(weights.apply(x)))
    equal = smape(np.expm1(y), to_price(x.mean(axis=1)))
    best_single = min(smape(np.expm1(y), to_price(x[:, i])) for i in range(3))
    assert fitted < equal
    assert fitted <= best_single + 1e-9


def test_knn_mean_excludes_same_group():
    keys = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]])
    values = np.array([10.0, 20.0, 30.0])
    groups = np.array([0, 1, 1])
    # query 0's nearest other-group neighbour is key 1
    out = knn_mean(keys[:1], keys, values, k=1, query_groups=groups[:1], key_groups=groups)
    assert out[0] == pytest.approx(20.0)
    # without groups, the query finds itself
    assert knn_mean(keys[:1], keys, values, k=1)[0] == pytest.approx(10.0)


def test_knn_alpha_zero_when_neighbours_useless_and_positive_when_informative():
    rng = np.random.default_rng(1)
    y = rng.normal(3, 1, 500)
    blended = y + rng.normal(0, 0.4, 500)
    # unrelated neighbours only help as mild shrinkage toward the mean
    assert fit_knn_alpha(blended, rng.normal(3, 1, 500), y, k=5).alpha < 0.15
    informative = y + rng.normal(0, 0.2, 500)
    assert fit_knn_alpha(blended, informative, y, k=5).alpha > 0.3


def test_state_roundtrip_predicts_the_same(tmp_path):
    rng = np.random.default_rng(2)
    y, x = _members(rng, 200)
    emb = rng.normal(size=(200, 8))
    weights = fit_blend_weights(x, y, ["a", "b", "c"])
    knn = fit_knn_alpha(weights.apply(x), knn_mean(emb, emb, y, 5), y, k=5)
    state = EnsembleState(weights, knn)
    state.save(tmp_path, emb, y)
    loaded, keys, values = EnsembleState.load(tmp_path)
    assert loaded.blend == weights and loaded.knn == knn
    before = state.predict_log(x[:20], emb[:20], emb, y)
    after = loaded.predict_log(x[:20], emb[:20], keys, values)
    np.testing.assert_allclose(after, before, atol=5e-3)


def test_to_price_clips_to_a_positive_range():
    prices = to_price(np.array([-50.0, 0.0, 100.0]))
    assert (prices > 0).all() and np.isfinite(prices).all()
