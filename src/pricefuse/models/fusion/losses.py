"""Training losses of the fusion head on log1p(price), and the schedules that switch between them
(`fusion.loss`, `fusion.loss_switch`).

Every loss compares log1p predictions with log1p targets and averages over rows. The names, with
the published write-up each comes from:
- `mse`: mean squared log1p error (the plain regression baseline of most write-ups).
- `smooth_l1`: torch's SmoothL1 with `fusion.smooth_l1_beta`: |x| - β/2 beyond β, x²/(2β) within
  (Activations' head). Huber divided by β: the same shape, gradients of at most 1 per row.
- `huber`: Huber with `fusion.huber_delta` (LORAverse): squared near zero (smooth,
  well-conditioned steps), linear for large errors, so the few mislabelled or wildly priced
  listings cannot dominate the gradient.
- `smape`: SMAPE itself, on (price + 1), which has a closed form in log1p space:
  2|p - q| / (p + q) with p = e^a, q = e^b equals 2·tanh(|a - b| / 2). No expm1, no division,
  bounded in [0, 2) like the metric, and exact for the metric up to the +1 shift (which only
  matters for items priced around a dollar or less). |x| is smoothed so the gradient is defined
  at a perfect prediction.
- `huber_smape`: the mean of the two.
- `minmax_bce` (SPAM_LLMs): target and prediction min-max scaled to [0, 1] with the fold's
  training-target min and max, then binary cross-entropy with the scaled target as a soft label.
  Its minimum is at the target (not zero: the soft label's entropy). It needs a head whose
  output lies in the training-target range (the `sigmoid` readout, lo + (hi - lo)·sigmoid(raw)):
  `LossPlan.needs_bounded_output` says so and `LossPlan.check_head_output` refuses any other.

A schedule is two names joined by `>`: `huber>smape` trains with Huber for the first
`fusion.loss_switch` fraction of the epoch budget and with SMAPE after (the write-ups' recipe:
well-conditioned steps while the head finds the price scale, the metric itself at the end). The
training loop's early stopping selects epochs by validation SMAPE whatever the loss, and its
patience counts from the switch at the earliest (`LossPlan.last_phase_start`), so a plateau in
the first phase cannot end training before the second begins.

Losses that need training-target statistics (minmax_bce's range) are built from the fold's
training targets: `build_loss_plan(cfg, target_log)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pricefuse.core.config import FusionConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Smoothing of |x| in the SMAPE surrogate, in log units; far below any error that matters.
SMAPE_SMOOTHING = 1e-3
# minmax_bce clamps the scaled prediction to [eps, 1 - eps]: a float32 sigmoid rounds to exactly
# 0 or 1 once |raw| passes ~17-88, and BCE there is log(0) = -inf with a 1/(p(1-p)) gradient that
# overflows. The clamp caps a row's loss at -log(eps) ≈ 13.8 and its gradient; 1 - 1e-6 is still
# distinct from 1 in float32 (spacing 6e-8 below 1).
BCE_EPS = 1e-6
# Joins the phases of a schedule in `fusion.loss`; at most MAX_PHASES of them.
PHASE_SEPARATOR = ">"
MAX_PHASES = 2
# The head readout minmax_bce needs (the heads' `output` option).
BOUNDED_OUTPUT = "sigmoid"


def mse_log(pred_log: torch.Tensor, target_log: torch.Tensor) -> torch.Tensor:
    """Mean squared log1p error."""
    return F.mse_loss(pred_log, target_log)


def smape_surrogate(pred_log: torch.Tensor, target_log: torch.Tensor) -> torch.Tensor:
    """Differentiable SMAPE (fraction, 0-2) on price + 1, from log1p values; mean over rows."""
    diff = pred_log - target_log
    smooth_abs = torch.sqrt(diff * diff + SMAPE_SMOOTHING**2) - SMAPE_SMOOTHING
    return (2.0 * torch.tanh(smooth_abs / 2.0)).mean()


def huber_smape(pred_log: torch.Tensor, target_log: torch.Tensor, delta: float) -> torch.Tensor:
    """Mean of Huber (`delta`) and the SMAPE surrogate."""
    huber = F.huber_loss(pred_log, target_log, delta=delta)
    return 0.5 * (huber + smape_surrogate(pred_log, target_log))


def minmax_bce(
    pred_log: torch.Tensor, target_log: torch.Tensor, lo: float, hi: float
) -> torch.Tensor:
    """BCE between prediction and target min-max scaled with the training range [lo, hi].

    The target is clamped to [0, 1] too: rows outside the range the plan was built on (none
    among that fold's training rows) count as the nearest bound instead of failing BCE's check.
    """
    span = hi - lo
    scaled_pred = ((pred_log - lo) / span).clamp(BCE_EPS, 1.0 - BCE_EPS)
    scaled_target = ((target_log - lo) / span).clamp(0.0, 1.0)
    return F.binary_cross_entropy(scaled_pred, scaled_target)


@dataclass(frozen=True)
class TargetRange:
    """The fold's training targets (log1p price): their min and max."""

    lo: float
    hi: float

    @classmethod
    def of(cls, target_log: np.ndarray) -> TargetRange:
        values = np.asarray(target_log, dtype=np.float64)
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError("loss targets must be a non-empty array of finite log1p prices")
        return cls(float(values.min()), float(values.max()))


def _build_minmax_bce(cfg: FusionConfig, targets: TargetRange) -> LossFn:
    if not targets.hi > targets.lo:
        raise ValueError(
            f"fusion.loss minmax_bce needs training targets that are not all equal "
            f"(all are {targets.lo:.4g}): min-max scaling divides by their range"
        )
    return functools.partial(minmax_bce, lo=targets.lo, hi=targets.hi)


# name -> builder from the fusion params and the fold's training-target range.
BUILDERS: Mapping[str, Callable[[FusionConfig, TargetRange], LossFn]] = {
    "mse": lambda cfg, _targets: mse_log,
    "smooth_l1": lambda cfg, _targets: functools.partial(F.smooth_l1_loss, beta=cfg.smooth_l1_beta),
    "huber": lambda cfg, _targets: functools.partial(F.huber_loss, delta=cfg.huber_delta),
    "smape": lambda cfg, _targets: smape_surrogate,
    "huber_smape": lambda cfg, _targets: functools.partial(huber_smape, delta=cfg.huber_delta),
    "minmax_bce": _build_minmax_bce,
}
LOSS_NAMES = tuple(BUILDERS)
# Losses whose prediction must lie in the training-target range (see the module docstring).
BOUNDED_LOSSES = frozenset({"minmax_bce"})


def parse_loss(cfg: FusionConfig) -> tuple[str, ...]:
    """The phases of `fusion.loss` (one name, or `first>second`), checked with the loss params;
    a ValueError naming the known losses otherwise. Called before any fold trains."""
    phases = tuple(part.strip() for part in cfg.loss.split(PHASE_SEPARATOR))
    problems = []
    unknown = [name for name in phases if name not in BUILDERS]
    if unknown:
        problems.append(
            f"unknown loss {', '.join(repr(n) for n in unknown)} in fusion.loss {cfg.loss!r}; "
            f"known: {', '.join(LOSS_NAMES)}"
        )
    if len(phases) > MAX_PHASES:
        problems.append(
            f"fusion.loss {cfg.loss!r} has {len(phases)} phases; at most {MAX_PHASES} "
            f"(e.g. huber{PHASE_SEPARATOR}smape)"
        )
    if len(phases) > 1 and not 0.0 < cfg.loss_switch < 1.0:
        problems.append(
            f"fusion.loss_switch must be in (0, 1) (the fraction of epochs before the switch), "
            f"got {cfg.loss_switch}"
        )
    for key in ("huber_delta", "smooth_l1_beta"):
        if not getattr(cfg, key) > 0:
            problems.append(f"fusion.{key} must be > 0, got {getattr(cfg, key)}")
    if problems:
        raise ValueError("; ".join(problems))
    return phases


@dataclass(frozen=True)
class LossPlan:
    """The loss of each epoch of one fold: one or two phases, switching at `switch` of the
    epoch budget; `target_range` is the fold's training-target range (the sigmoid readout's
    bounds when `needs_bounded_output`)."""

    spec: str
    phases: tuple[tuple[str, LossFn], ...]
    switch: float
    target_range: TargetRange

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.phases)

    @property
    def needs_bounded_output(self) -> bool:
        """True when some phase needs predictions inside `target_range` (the sigmoid readout)."""
        return any(name in BOUNDED_LOSSES for name in self.names)

    def last_phase_start(self, n_epochs: int) -> int:
        """0-based epoch the last phase starts at: round(switch · n_epochs), at least 1, for a
        schedule; 0 for a single loss."""
        if len(self.phases) == 1:
            return 0
        return max(1, round(self.switch * n_epochs))

    def loss_for_epoch(self, epoch: int, n_epochs: int) -> LossFn:
        """The loss of 0-based `epoch` out of `n_epochs`."""
        if not 0 <= epoch < n_epochs:
            raise ValueError(f"epoch {epoch} outside 0..{n_epochs - 1}")
        phase = 0 if epoch < self.last_phase_start(n_epochs) else len(self.phases) - 1
        return self.phases[phase][1]

    def check_head_output(self, output: str) -> None:
        """Refuse a head whose readout cannot keep predictions in the range a bounded loss
        scales by (anything but the sigmoid readout, for minmax_bce)."""
        if self.needs_bounded_output and output != BOUNDED_OUTPUT:
            raise ValueError(
                f"fusion.loss {self.spec!r} uses minmax_bce, which needs the {BOUNDED_OUTPUT} "
                f"readout (predictions bounded to the training-target range "
                f"[{self.target_range.lo:.3f}, {self.target_range.hi:.3f}]); the head's "
                f"readout is {output!r}"
            )


def build_loss_plan(cfg: FusionConfig, target_log: np.ndarray) -> LossPlan:
    """The fold's loss plan from the fusion params and that fold's training targets (log1p)."""
    phases = parse_loss(cfg)
    targets = TargetRange.of(target_log)
    return LossPlan(
        spec=cfg.loss,
        phases=tuple((name, BUILDERS[name](cfg, targets)) for name in phases),
        switch=cfg.loss_switch,
        target_range=targets,
    )
