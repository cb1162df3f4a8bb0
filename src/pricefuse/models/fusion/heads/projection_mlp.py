"""`projection_mlp`: each modality projected to one width, concatenated, then a plain MLP.

Why this shape (the Activations write-up, Amazon ML Challenge 2025): the simplest late fusion
that still gives every modality the same say at the start: each input is projected to
`proj_dim` (256 there), the projections are concatenated and a 512 -> 256 -> 64 -> 1 MLP with
GELU, BatchNorm and dropout 0.25 regresses the price.
"""

from __future__ import annotations

import torch
from torch import nn

from pricefuse.core.config import ProjectionMlpConfig
from pricefuse.models.fusion.heads.base import FusionHeadBase, project, stack


def _block(in_dim: int, width: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.GELU(), nn.Dropout(dropout)
    )


class ProjectionMlpHead(FusionHeadBase):
    """Knobs: fusion.heads.projection_mlp (proj_dim, widths, dropout)."""

    def build(self) -> None:
        opts = self.arch.parse_options(ProjectionMlpConfig)
        self.unit_embedding = self.new_unit_embedding()
        dims = self.modality_dims()
        self.proj = nn.ModuleDict(
            {name: _block(dim, opts.proj_dim, opts.dropout) for name, dim in dims.items()}
        )
        self.mlp, width = stack(
            len(dims) * opts.proj_dim, opts.widths, lambda i, o: _block(i, o, opts.dropout)
        )
        self.out = nn.Linear(width, 1)

    def raw(self, parts: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        fused = torch.cat(project(self.proj, parts, mask), dim=-1)
        return self.out(self.mlp(fused)).squeeze(-1)
