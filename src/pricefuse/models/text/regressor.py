"""Backbone + head: the network of the text member, and how it predicts rows.

The head reads the backbone's pooled vector (dropout, then one linear layer) and predicts the
*standardised* log1p price: z = (log1p(price) - mean) / std, with mean and std of the fold's
training rows kept as buffers. A standardised target makes one head learning rate and one Huber
delta fit any price range; predictions are clipped to the training rows' log range.

While the backbone is frozen (the first `text.frozen_epochs`), it runs without autograd: those
epochs cost a forward pass only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from pricefuse.models.text.backbones import TextBackbone


@dataclass(frozen=True)
class TargetScale:
    """Standardisation and clip range of the log1p target (from one fold's training rows)."""

    mean: float
    std: float
    low: float
    high: float

    @classmethod
    def fit(cls, y_log: np.ndarray) -> TargetScale:
        y = np.asarray(y_log, dtype=np.float64)
        return cls(float(y.mean()), float(max(y.std(), 1e-6)), float(y.min()), float(y.max()))

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, raw: dict[str, float]) -> TargetScale:
        return cls(float(raw["mean"]), float(raw["std"]), float(raw["low"]), float(raw["high"]))


class TextRegressor(torch.nn.Module):
    """(input_ids, attention_mask) -> (standardised prediction z, pooled vector)."""

    def __init__(self, backbone: torch.nn.Module, dim: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(dim, 1))
        torch.nn.init.normal_(self.head[1].weight, std=0.02)
        torch.nn.init.zeros_(self.head[1].bias)  # starts at the mean price
        self.frozen = False

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            pooled = self.backbone(input_ids, attention_mask)
        z = self.head(pooled.float()).squeeze(-1)
        return z, pooled


def build_regressor(backbone: TextBackbone, dropout: float) -> TextRegressor:
    return TextRegressor(backbone.module, backbone.dim, dropout)


def set_frozen(backbone: TextBackbone, regressor: TextRegressor, frozen: bool) -> None:
    """Freeze (or unfreeze) the backbone: its parameters and the regressor's no-grad pass."""
    backbone.set_frozen(frozen)
    regressor.frozen = frozen


def head_state(regressor: TextRegressor) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in regressor.head.state_dict().items()}


@dataclass
class RowOutputs:
    """Per-row outputs of a prediction pass, in the order of `rows`."""

    rows: np.ndarray
    z: np.ndarray
    pooled: np.ndarray | None

    def log_price(self, scale: TargetScale) -> np.ndarray:
        return np.clip(scale.mean + scale.std * self.z, scale.low, scale.high)


Gather = Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


def predict_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    rows: np.ndarray,
    device: torch.device,
    keep_pooled: bool,
    gather: Gather | None = None,
) -> RowOutputs:
    """Run `model` (eval mode, no autograd) over the batches of `rows` (TokenRows positions) and
    return the outputs in the order of `rows`. Batches may come in any order (sorted by length)
    and sharded over processes: `gather` collects every process's part (accelerate's
    `gather_for_metrics`), and each output lands by its row."""
    rows = np.asarray(rows, dtype=np.int64)
    position = {int(r): i for i, r in enumerate(rows)}
    was_training = model.training
    model.eval()
    z_out = np.full(len(rows), np.nan, dtype=np.float64)
    pooled_out: np.ndarray | None = None
    seen = np.zeros(len(rows), dtype=bool)
    with torch.inference_mode():
        for batch in batches:
            z, pooled = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            parts = (batch["row"].to(device), z.float(), pooled.float())
            if gather is not None:
                parts = gather(parts)
            where = np.array([position[int(r)] for r in parts[0].cpu().tolist()], dtype=np.int64)
            z_out[where] = parts[1].cpu().numpy()
            seen[where] = True
            if keep_pooled:
                if pooled_out is None:
                    pooled_out = np.zeros((len(rows), parts[2].shape[1]), dtype=np.float32)
                pooled_out[where] = parts[2].cpu().numpy()
    model.train(was_training)
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} of {len(rows)} rows got no prediction")
    return RowOutputs(rows, z_out, pooled_out)
