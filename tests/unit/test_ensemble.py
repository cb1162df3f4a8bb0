import numpy as np
import pytest

from pricefuse.core.metrics import smape
from pricefuse.models.ensemble.blend import (
    EnsembleState,
    Stacker,
    fit_blend_weights,
    fit_ensemble,
    leave_one_out,
    stack_inputs,
    stacker_oof,
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


def _meta(rng, n):
    return np.column_stack([rng.integers(0, 2, n), rng.normal(6, 1, n)])


@pytest.mark.parametrize("kind", ["ridge", "lightgbm"])
def test_state_roundtrip_predicts_the_same(tmp_path, kind):
    rng = np.random.default_rng(2)
    y, x = _members(rng, 300)
    meta = _meta(rng, 300)
    weights = fit_blend_weights(x, y, ["a", "b", "c"])
    stacker = Stacker(kind, alpha=1.0, seed=0).fit(stack_inputs(x, meta), y)
    state = EnsembleState(weights, kind, stacker)
    state.save(tmp_path)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.joblib"))
    loaded = EnsembleState.load(tmp_path)
    assert loaded.blend == weights and loaded.method == kind
    np.testing.assert_allclose(loaded.predict_log(x, meta), state.predict_log(x, meta))
    # the blend path ignores the stacker
    blend_only = EnsembleState(weights)
    np.testing.assert_allclose(blend_only.predict_log(x, meta), weights.apply(x))


def test_stacker_oof_is_honest_and_fit_ensemble_keeps_the_better_method():
    """A member that is good only on rows with an image: a stacker using the has_image
    meta-feature can exploit it, a global blend cannot; the ensemble must keep the stacker."""
    rng = np.random.default_rng(3)
    n = 1500
    y = rng.normal(3.0, 1.0, n)
    has_image = rng.integers(0, 2, n)
    member_a = np.where(has_image == 1, y + rng.normal(0, 0.05, n), rng.normal(3, 1, n))
    member_b = np.where(has_image == 1, rng.normal(3, 1, n), y + rng.normal(0, 0.05, n))
    x = np.column_stack([member_a, member_b])
    meta = np.column_stack([has_image, np.zeros(n)])
    folds = np.arange(n) % 5
    fit = fit_ensemble(x, ["a", "b"], y, folds, meta, ["ridge", "lightgbm"], 1.0, seed=0)
    assert fit.state.method == "lightgbm", fit.metrics
    assert fit.metrics["smape_oof"] == pytest.approx(fit.metrics["smape_oof_stack_lightgbm"])
    assert fit.metrics["smape_oof_stack_lightgbm"] < fit.metrics["smape_oof_blend"] - 5
    # honest OOF: fold k's stacker predictions come from a stacker fit without fold k
    inputs = stack_inputs(x, meta)
    held = folds == 2
    alone = Stacker("ridge", 1.0, 0).fit(inputs[~held], y[~held]).predict(inputs[held])
    np.testing.assert_allclose(stacker_oof("ridge", inputs, y, folds, 1.0, 0)[held], alone)
    # and where no stacker helps, the blend is kept
    plain = fit_ensemble(x[:, :1], ["a"], y, folds, meta[:, 1:], [], 1.0, seed=0)
    assert plain.state.method == "blend"


def test_leave_one_out_shows_what_each_member_adds():
    rng = np.random.default_rng(4)
    y, x = _members(rng, 800)
    scores = leave_one_out(x, ["good", "noisy", "biased"], y)
    assert scores["good"] > scores["noisy"] + 5  # dropping the good member hurts most


def test_to_price_clips_to_a_positive_range():
    prices = to_price(np.array([-50.0, 0.0, 100.0]))
    assert (prices > 0).all() and np.isfinite(prices).all()
