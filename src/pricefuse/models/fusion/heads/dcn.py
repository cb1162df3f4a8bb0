"""`dcn`: Deep & Cross Network v2 beside a deep MLP with Dice activations.

Why this shape (the MM-CTR write-up, after DCN-v2, Wang et al. 2021, and DIN's Dice, Zhou et
al. 2018): prices are products of factors (unit price x quantity x pack), and a cross layer
`x_{l+1} = x0 * (W x_l + b) + x_l` builds explicit feature interactions of rising order with a
residual path, while the deep MLP learns the implicit rest. Each modality is first projected
to `proj_dim`; x0 is their concatenation; the cross and deep outputs are concatenated and
mapped to the price by one linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

from pricefuse.core.config import DcnConfig
from pricefuse.models.fusion.heads.base import FusionHeadBase, project, stack


class Dice(nn.Module):
    """Data-adaptive PReLU: p = sigmoid(BN(s)) (BN without affine), out = p*s + (1-p)*alpha*s.
    The switch point follows the batch's distribution instead of sitting at 0."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(width, affine=False)
        self.alpha = nn.Parameter(torch.zeros(width))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.norm(s))
        return p * s + (1.0 - p) * self.alpha * s


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer (full-rank W)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DcnHead(FusionHeadBase):
    """Knobs: fusion.heads.dcn (proj_dim, cross_layers, widths of the deep part, dropout)."""

    def build(self) -> None:
        opts = self.arch.parse_options(DcnConfig)
        self.unit_embedding = self.new_unit_embedding()
        dims = self.modality_dims()
        self.proj = nn.ModuleDict(
            {name: nn.Linear(dim, opts.proj_dim) for name, dim in dims.items()}
        )
        width = len(dims) * opts.proj_dim
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(opts.cross_layers))
        self.deep, deep_width = stack(
            width,
            opts.widths,
            lambda i, o: nn.Sequential(nn.Linear(i, o), Dice(o), nn.Dropout(opts.dropout)),
        )
        self.out = nn.Linear(width + deep_width, 1)

    def raw(self, parts: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat(project(self.proj, parts, mask), dim=-1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.out(torch.cat([x, self.deep(x0)], dim=-1)).squeeze(-1)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors])


class _StackedLinear:
    """K `nn.Linear` layers of one shape as (K, out, in) weights: one batched product."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        self.weight_t = _stack([layer.weight for layer in layers]).transpose(1, 2).contiguous()
        self.bias = _stack([layer.bias for layer in layers]).unsqueeze(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight_t)


class _StackedDice:
    """K `Dice` activations (eval mode: their BatchNorm is its running statistics)."""

    def __init__(self, layers: list[Dice]) -> None:
        self.mean = _stack([layer.norm.running_mean for layer in layers]).unsqueeze(1)
        var = _stack([layer.norm.running_var for layer in layers]).unsqueeze(1)
        self.invstd = torch.rsqrt(var + layers[0].norm.eps)
        self.alpha = _stack([layer.alpha for layer in layers]).unsqueeze(1)

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid((s - self.mean) * self.invstd)
        return p * s + (1.0 - p) * self.alpha * s


class StackedDcn:
    """The fold heads of one `dcn` run evaluated together, in eval mode: inputs stacked along a
    first fold axis (K, n, ...), each layer one batched product over the K folds' weights.

    Why: a served row ran K heads of ~45 small operations each, and the fixed cost of each
    operation, not the arithmetic, was the fusion member's time; stacked, the row costs ~45
    operations. The arithmetic is DcnHead's (plus FusionHeadBase's input standardisation,
    image mask and readout) on the same weights, so each fold's output equals its head's to
    float rounding (batched instead of single products; tests/unit/test_fusion_heads.py).
    Only for heads in eval mode; the unit embeddings (one vocabulary per fold) share one table
    with per-fold offsets.
    """

    def __init__(self, heads: list[DcnHead]) -> None:
        first = heads[0]
        if not all(isinstance(h, DcnHead) and not h.training for h in heads):
            raise ValueError("StackedDcn takes DcnHead instances in eval mode")
        comparable = {**first.arch.to_dict(), "n_units": None}
        if any({**h.arch.to_dict(), "n_units": None} != comparable for h in heads):
            raise ValueError("the heads differ in more than their unit vocabularies")
        self.k_folds = len(heads)
        self.output = first.arch.output
        self.joint_dim = first.arch.joint_dim
        buffers = ["target_mean", "target_std", "text_mean", "text_std", "image_mean"]
        buffers += ["image_std"] + (["target_lo", "target_hi"] if self.output == "sigmoid" else [])
        buffers += ["joint_mean", "joint_std"] if self.joint_dim else []
        self.buffers = {
            name: _stack([getattr(h, name) for h in heads]).unsqueeze(1) for name in buffers
        }
        tables = [h.unit_embedding.weight.detach() for h in heads]
        self.unit_table = torch.cat(tables)
        sizes = torch.tensor([0] + [len(t) for t in tables[:-1]])
        self.unit_offsets = torch.cumsum(sizes, 0).view(-1, 1)
        self.proj = {name: _StackedLinear([h.proj[name] for h in heads]) for name in first.proj}
        self.cross = [
            _StackedLinear([h.cross[i].linear for h in heads]) for i in range(len(first.cross))
        ]
        self.deep = [
            (
                _StackedLinear([h.deep[i][0] for h in heads]),
                _StackedDice([h.deep[i][1] for h in heads]),
            )
            for i in range(len(first.deep))
        ]
        self.out = _StackedLinear([h.out for h in heads])

    @torch.inference_mode()
    def __call__(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        unit: torch.Tensor,
        numeric: torch.Tensor,
        joint: torch.Tensor,
    ) -> torch.Tensor:
        """(K, n) log1p prices from the K folds' inputs stacked as (K, n, ...)."""
        b = self.buffers
        mask = image_mask.bool().unsqueeze(-1)
        parts = {
            "text": (text - b["text_mean"]) / b["text_std"],
            "image": torch.where(mask, (image - b["image_mean"]) / b["image_std"], 0.0),
            "unit": self.unit_table[unit + self.unit_offsets],
            "numeric": numeric,
        }
        if self.joint_dim:
            parts["joint"] = (joint - b["joint_mean"]) / b["joint_std"]
        projected = []
        for name, x in parts.items():
            y = self.proj[name](x)
            projected.append(torch.where(mask, y, 0.0) if name == "image" else y)
        x0 = torch.cat(projected, dim=-1)
        x = x0
        for linear in self.cross:
            x = x0 * linear(x) + x
        deep = x0
        for linear, dice in self.deep:
            deep = dice(linear(deep))
        raw = self.out(torch.cat([x, deep], dim=-1)).squeeze(-1)
        if self.output == "sigmoid":  # the scalar buffers are (K, 1) here
            return b["target_lo"] + (b["target_hi"] - b["target_lo"]) * torch.sigmoid(raw)
        return b["target_mean"] + b["target_std"] * raw
