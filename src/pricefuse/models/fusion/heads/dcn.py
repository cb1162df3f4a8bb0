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
