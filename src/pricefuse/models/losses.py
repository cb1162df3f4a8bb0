"""Training losses on log1p(price) predictions.

The competition metric is SMAPE on prices. Two ways to train for it:
- `huber`: Huber on the log1p error. Squared near zero (smooth, well-conditioned steps), linear
  for large errors, so the few mislabelled or wildly priced listings cannot dominate the
  gradient. The log-space median it converges to is already close to SMAPE's optimum.
- `smape`: SMAPE itself, on (price + 1), which has a closed form in log1p space:
  2|p - q| / (p + q) with p = e^a, q = e^b equals 2·tanh(|a - b| / 2). No expm1, no division,
  bounded in [0, 2) like the metric, and exact for the metric up to the +1 shift (which only
  matters for items priced around a dollar or less). |x| is smoothed so the gradient is defined
  at a perfect prediction.
- `huber_smape`: their mean — Huber's well-conditioned steps early on, SMAPE's metric-shaped
  loss at the end.

The default is the one that measured best (see FusionConfig.loss in params.yaml).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# One log unit: errors beyond a factor of e (~2.7x) in price are treated as outliers.
HUBER_DELTA = 1.0
# Smoothing of |x| in the SMAPE surrogate, in log units; far below any error that matters.
SMAPE_SMOOTHING = 1e-3


def huber_log(pred_log: torch.Tensor, target_log: torch.Tensor) -> torch.Tensor:
    """Huber loss on the log1p error, mean over rows."""
    return F.huber_loss(pred_log, target_log, delta=HUBER_DELTA)


def smape_surrogate(pred_log: torch.Tensor, target_log: torch.Tensor) -> torch.Tensor:
    """Differentiable SMAPE (fraction, 0-2) on price + 1, from log1p values; mean over rows."""
    diff = pred_log - target_log
    smooth_abs = torch.sqrt(diff * diff + SMAPE_SMOOTHING**2) - SMAPE_SMOOTHING
    return (2.0 * torch.tanh(smooth_abs / 2.0)).mean()


def huber_smape(pred_log: torch.Tensor, target_log: torch.Tensor) -> torch.Tensor:
    """Mean of the two losses above."""
    return 0.5 * (huber_log(pred_log, target_log) + smape_surrogate(pred_log, target_log))


LOSSES: dict[str, LossFn] = {
    "huber": huber_log,
    "smape": smape_surrogate,
    "huber_smape": huber_smape,
}


def get_loss(name: str) -> LossFn:
    """Look a loss up by its params.yaml name, failing with the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown fusion loss {name!r}; known: {', '.join(LOSSES)}") from None
