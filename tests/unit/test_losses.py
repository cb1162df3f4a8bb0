"""Training losses: the SMAPE surrogate agrees with the metric, Huber has its two regimes, and
every registered loss gives finite gradients, including at a perfect prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pricefuse.metrics import smape
from pricefuse.models.losses import (
    HUBER_DELTA,
    LOSSES,
    get_loss,
    huber_log,
    smape_surrogate,
)


def test_smape_surrogate_is_smape_on_price_plus_one() -> None:
    rng = np.random.default_rng(0)
    target = rng.uniform(0.0, 7.0, 500)
    pred = target + rng.normal(0.0, 0.8, 500)
    value = float(smape_surrogate(torch.tensor(pred), torch.tensor(target)))
    expected = smape(np.exp(target), np.exp(pred)) / 100.0  # exp(log1p(p)) = price + 1
    assert value == pytest.approx(expected, abs=1e-3)


def test_smape_surrogate_is_bounded_like_the_metric() -> None:
    value = float(smape_surrogate(torch.tensor([30.0, -30.0]), torch.tensor([0.0, 0.0])))
    assert 1.99 < value <= 2.0


def test_huber_is_quadratic_then_linear() -> None:
    zero = torch.tensor([0.0])
    small, large = 0.3, 4.0
    assert float(huber_log(torch.tensor([small]), zero)) == pytest.approx(0.5 * small**2)
    expected_large = HUBER_DELTA * (large - 0.5 * HUBER_DELTA)
    assert float(huber_log(torch.tensor([large]), zero)) == pytest.approx(expected_large)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_have_finite_gradients_pointing_at_the_target(name: str) -> None:
    loss_fn = get_loss(name)
    target = torch.tensor([1.0, 2.0, 3.0])
    perfect = target.clone().requires_grad_(True)
    value = loss_fn(perfect, target)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert perfect.grad is not None and torch.isfinite(perfect.grad).all()

    too_high = (target + 0.5).requires_grad_(True)
    loss_fn(too_high, target).backward()
    assert too_high.grad is not None and (too_high.grad > 0).all()


def test_unknown_loss_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="huber"):
        get_loss("mse")
