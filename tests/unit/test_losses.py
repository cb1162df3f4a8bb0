"""Fusion losses and schedules: every loss is smallest at the target with finite gradients that
point back at it, the params reach the losses, schedules switch at the right epoch, bad
`fusion.loss` values fail with the known names, and K-fold training works with each loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_train_fusion import CFG, synthetic

from pricefuse.core.config import FusionConfig
from pricefuse.core.metrics import smape, smape_from_log
from pricefuse.models.fusion.losses import (
    BCE_EPS,
    BOUNDED_LOSSES,
    LOSS_NAMES,
    LossPlan,
    build_loss_plan,
    parse_loss,
    smape_surrogate,
)
from pricefuse.models.fusion.training import train_kfold
from tests.support import project_params

FUSION = project_params().fusion
# The fold's training targets the plans below are built on: log1p prices in [0, 6].
TRAIN_TARGETS = np.array([0.0, 1.0, 2.5, 4.0, 6.0])
TARGET = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)


def plan_for(loss: str, **changes: object) -> LossPlan:
    cfg = dataclasses.replace(FUSION, loss=loss, **changes)
    return build_loss_plan(cfg, TRAIN_TARGETS)


def loss_of(name: str, **changes: object):
    plan = plan_for(name, **changes)
    assert plan.names == (name,)
    return plan.loss_for_epoch(0, 1)


def value(name: str, pred: list[float], target: list[float], **changes: object) -> float:
    return float(loss_of(name, **changes)(torch.tensor(pred), torch.tensor(target)))


def test_smape_surrogate_is_smape_on_price_plus_one() -> None:
    rng = np.random.default_rng(0)
    target = rng.uniform(0.0, 7.0, 500)
    pred = target + rng.normal(0.0, 0.8, 500)
    got = float(smape_surrogate(torch.tensor(pred), torch.tensor(target)))
    expected = smape(np.exp(target), np.exp(pred)) / 100.0  # exp(log1p(p)) = price + 1
    assert got == pytest.approx(expected, abs=1e-3)


def test_smape_surrogate_is_bounded_like_the_metric() -> None:
    got = float(smape_surrogate(torch.tensor([30.0, -30.0]), torch.tensor([0.0, 0.0])))
    assert 1.99 < got <= 2.0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_each_loss_is_smallest_at_the_target_with_gradients_pointing_back(name: str) -> None:
    loss_fn = loss_of(name)
    perfect = TARGET.clone().requires_grad_(True)
    at_target = loss_fn(perfect, TARGET)
    at_target.backward()
    assert perfect.grad is not None and torch.isfinite(perfect.grad).all()
    assert perfect.grad.abs().max() < 1e-6  # a minimum: flat there
    if name not in BOUNDED_LOSSES:  # BCE with soft labels bottoms out at their entropy
        assert at_target.item() == pytest.approx(0.0, abs=1e-6)
    for shift, sign in ((0.4, 1.0), (-0.4, -1.0)):
        off = (TARGET + shift).requires_grad_(True)
        off_value = loss_fn(off, TARGET)
        off_value.backward()
        assert off_value.item() > at_target.item()
        assert off.grad is not None and torch.isfinite(off.grad).all()
        assert (sign * off.grad > 0).all()  # descent moves the prediction back to the target


def test_huber_and_huber_smape_honour_delta() -> None:
    delta, small, large = 0.5, 0.3, 4.0
    assert value("huber", [small], [0.0], huber_delta=delta) == pytest.approx(0.5 * small**2)
    expected_large = delta * (large - 0.5 * delta)
    assert value("huber", [large], [0.0], huber_delta=delta) == pytest.approx(expected_large)
    smape_large = float(smape_surrogate(torch.tensor([large]), torch.tensor([0.0])))
    assert value("huber_smape", [large], [0.0], huber_delta=delta) == pytest.approx(
        0.5 * (expected_large + smape_large)
    )


def test_smooth_l1_honours_beta_and_mse_is_squared() -> None:
    beta = 2.0
    assert value("smooth_l1", [1.0], [0.0], smooth_l1_beta=beta) == pytest.approx(0.5 / beta)
    assert value("smooth_l1", [4.0], [0.0], smooth_l1_beta=beta) == pytest.approx(4.0 - beta / 2)
    assert value("mse", [1.0, 3.0], [0.0, 0.0]) == pytest.approx(5.0)


def test_minmax_bce_is_smallest_at_the_target_and_finite_at_the_extremes() -> None:
    loss_fn = loss_of("minmax_bce")
    grid = torch.linspace(-1.0, 7.0, 801, dtype=torch.float64)
    for target in (0.5, 2.5, 5.9):
        curve = torch.stack(
            [loss_fn(p.reshape(1), torch.tensor([target], dtype=grid.dtype)) for p in grid]
        )
        assert float(grid[curve.argmin()]) == pytest.approx(target, abs=0.011)
    # Far outside the training range the scaled prediction is clamped: finite loss, capped.
    wild = torch.tensor([-50.0, 80.0], requires_grad=True)
    out = loss_fn(wild, torch.tensor([3.0, 3.0]))
    out.backward()
    assert torch.isfinite(out) and out.item() <= -np.log(BCE_EPS) + 1e-3
    assert wild.grad is not None and torch.isfinite(wild.grad).all()


def test_minmax_bce_needs_a_bounded_readout_and_a_target_range() -> None:
    plan = plan_for("huber>minmax_bce")
    assert plan.needs_bounded_output
    assert (plan.target_range.lo, plan.target_range.hi) == (0.0, 6.0)
    plan.check_head_output("sigmoid")
    with pytest.raises(ValueError, match=r"minmax_bce.*sigmoid readout.*'affine'"):
        plan.check_head_output("affine")
    for name in set(LOSS_NAMES) - BOUNDED_LOSSES:
        plan_for(name).check_head_output("affine")
        assert not plan_for(name).needs_bounded_output
    cfg = dataclasses.replace(FUSION, loss="minmax_bce")
    with pytest.raises(ValueError, match="not all equal"):
        build_loss_plan(cfg, np.full(10, 2.0))
    with pytest.raises(ValueError, match="finite"):
        build_loss_plan(cfg, np.array([1.0, np.nan]))


def test_schedule_switches_at_its_fraction_of_the_epoch_budget() -> None:
    plan = plan_for("huber>smape", loss_switch=0.75)
    assert plan.names == ("huber", "smape")
    huber, smape_fn = (fn for _, fn in plan.phases)
    chosen = [plan.loss_for_epoch(epoch, 40) for epoch in range(40)]
    assert chosen == [huber] * 30 + [smape_fn] * 10
    assert plan.last_phase_start(40) == 30
    # 0.7 * 10 is 7.000000000000001 in floating point: still 7 epochs of the first loss.
    assert plan_for("mse>smape", loss_switch=0.7).last_phase_start(10) == 7
    # A short budget keeps at least one epoch of the first loss.
    assert plan_for("huber>smape", loss_switch=0.1).last_phase_start(3) == 1
    single = plan_for("smape")
    assert single.last_phase_start(40) == 0
    assert {single.loss_for_epoch(e, 5) for e in range(5)} == {single.phases[0][1]}
    with pytest.raises(ValueError, match="outside"):
        plan.loss_for_epoch(40, 40)


@pytest.mark.parametrize(
    ("loss", "changes", "message"),
    [
        ("l1", {}, r"unknown loss 'l1'.*known: mse, smooth_l1, huber, smape, huber_smape"),
        ("huber>smape_x", {}, r"unknown loss 'smape_x'.*minmax_bce"),
        ("mse>huber>smape", {}, "3 phases; at most 2"),
        ("huber>smape", {"loss_switch": 1.0}, r"loss_switch must be in \(0, 1\)"),
        ("huber>smape", {"loss_switch": 0.0}, r"loss_switch must be in \(0, 1\)"),
        ("huber", {"huber_delta": 0.0}, "huber_delta must be > 0"),
        ("smooth_l1", {"smooth_l1_beta": -1.0}, "smooth_l1_beta must be > 0"),
    ],
)
def test_bad_loss_params_fail_with_clear_errors(loss: str, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_loss(dataclasses.replace(FUSION, loss=loss, **changes))


def test_the_params_file_loss_parses() -> None:
    assert parse_loss(FUSION)


def tiny_problem() -> tuple:
    """The synthetic problem of test_train_fusion on 2 folds, and a small, short config
    (every loss reaches about half the constant predictor's SMAPE on it: 37-40 vs 76)."""
    data = synthetic(400, seed=8)
    data.frame["fold"] = data.frame["fold"] % 2
    gated = dataclasses.replace(CFG.heads.gated_residual, hidden=16)
    cfg = dataclasses.replace(
        CFG,
        epochs=15,
        patience=15,
        loss_switch=0.5,
        heads=dataclasses.replace(CFG.heads, gated_residual=gated),
    )
    return data, cfg


@pytest.mark.parametrize(
    "loss",
    [
        *LOSS_NAMES,
        "huber>smape",
    ],
)
def test_kfold_training_with_each_loss_beats_a_constant(loss: str) -> None:
    data, cfg = tiny_problem()
    output = "sigmoid" if loss in BOUNDED_LOSSES else "affine"
    result = train_kfold(data, dataclasses.replace(cfg, loss=loss, output=output), seed=3)
    y = data.target
    constant = smape_from_log(y, np.full_like(y, np.median(y)))
    assert result.smape_oof < 0.7 * constant, (loss, result.smape_oof, constant)


def test_training_refuses_minmax_bce_on_the_affine_readout() -> None:
    data, cfg = tiny_problem()
    with pytest.raises(ValueError, match="sigmoid readout"):
        train_kfold(data, dataclasses.replace(cfg, loss="minmax_bce", output="affine"), seed=3)


def test_bad_loss_fails_before_any_fold_trains() -> None:
    data, cfg = tiny_problem()
    bad: FusionConfig = dataclasses.replace(cfg, loss="huber>nope", epochs=10_000)
    with pytest.raises(ValueError, match="known: mse"):
        train_kfold(data, bad, seed=3)


def test_patience_lets_the_last_phase_of_a_schedule_run() -> None:
    """With lr 0 no epoch improves on the first, so patience alone would stop at epoch
    1 + patience; a schedule's second phase still gets its `patience` epochs. (A head without
    BatchNorm: its running statistics would change the predictions even at lr 0.)"""
    data, cfg = tiny_problem()
    frozen = dataclasses.replace(
        cfg, arch="gated_residual", lr=0.0, epochs=8, patience=2, loss_switch=0.5
    )
    plain = train_kfold(data, dataclasses.replace(frozen, loss="huber"), seed=3)
    scheduled = train_kfold(data, dataclasses.replace(frozen, loss="huber>smape"), seed=3)
    for history in plain.histories.values():
        assert len(history.val_smape) == 1 + 2
    for history in scheduled.histories.values():
        assert len(history.val_smape) == 4 + 2
