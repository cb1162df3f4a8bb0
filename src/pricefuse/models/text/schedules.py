"""Learning-rate and loss schedules of the text regressor (`text.schedule`, `text.smape_epochs`).

Learning rate, as a factor of each parameter group's own rate (backbone `encoder_lr`, head
`head_lr`), over optimizer steps, after a linear warm-up of `warmup_fraction` of all steps:
- `linear`: linear decay to zero (the usual recipe for fine-tuning transformers);
- `onecycle`: warm-up from 1/25 of the rate, then cosine annealing to 1/10^4 of it (the shape of
  torch's OneCycleLR, per group);
- `cosine_restarts`: cosine decay to zero within each epoch, restarting at the full rate (SGDR,
  one cycle per epoch).

Loss: Huber on the standardised log1p price first (well-conditioned steps while the head and the
backbone find the price scale), then the differentiable SMAPE (`pricefuse.models.fusion.losses`)
for the
last `smape_epochs` epochs, so the final epochs optimise the competition metric itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from pricefuse.models.fusion.losses import smape_surrogate
from pricefuse.models.text.regressor import TargetScale

SCHEDULES = ("linear", "onecycle", "cosine_restarts")
ONECYCLE_START = 1.0 / 25.0  # OneCycleLR's div_factor
ONECYCLE_END = 1e-4  # ... and its final_div_factor relative to the peak

TextLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lr_factor(
    schedule: str, step: int, total_steps: int, warmup_steps: int, cycle_steps: int
) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown text.schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        ramp = (step + 1) / warmup_steps
        return ONECYCLE_START + (1 - ONECYCLE_START) * ramp if schedule == "onecycle" else ramp
    after = step - warmup_steps
    if schedule == "linear":
        return max(0.0, 1.0 - after / max(1, total_steps - warmup_steps))
    if schedule == "onecycle":
        progress = min(1.0, after / max(1, total_steps - warmup_steps))
        return ONECYCLE_END + (1 - ONECYCLE_END) * 0.5 * (1 + math.cos(math.pi * progress))
    progress = (after % max(1, cycle_steps)) / max(1, cycle_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_fraction: float,
    steps_per_epoch: int,
) -> LambdaLR:
    """A LambdaLR stepping once per optimizer update (not per micro-batch)."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"text.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup = int(warmup_fraction * total_steps)
    lr_factor(schedule, 0, total_steps, warmup, steps_per_epoch)  # fail early on a bad name

    def factor(step: int) -> float:
        return lr_factor(schedule, step, total_steps, warmup, steps_per_epoch)

    return LambdaLR(optimizer, factor)


def epoch_loss_name(epoch: int, epochs: int, smape_epochs: int) -> str:
    """`huber` or `smape` for 0-based `epoch`: SMAPE for the last `smape_epochs`."""
    return "smape" if epoch >= epochs - smape_epochs else "huber"


def make_loss(name: str, scale: TargetScale, huber_delta: float) -> TextLoss:
    """loss(z_pred, y_log): Huber between standardised prediction and target, or SMAPE on the
    prices both stand for."""
    if name == "huber":

        def huber(z: torch.Tensor, y_log: torch.Tensor) -> torch.Tensor:
            return F.huber_loss(z, (y_log - scale.mean) / scale.std, delta=huber_delta)

        return huber
    if name == "smape":

        def smape(z: torch.Tensor, y_log: torch.Tensor) -> torch.Tensor:
            return smape_surrogate(scale.mean + scale.std * z, y_log)

        return smape
    raise ValueError(f"unknown text loss {name!r}; known: huber, smape")
