"""`towers`: one tower per embedding type, concatenated, then an MLP head.

Why this shape (the SPAM_LLMs write-up, Amazon ML Challenge 2025): each embedding (text, image
and, with `fusion.joint_tower`, the joint CLIP-like text+image embedding) gets its own
Linear -> ReLU -> BatchNorm -> Dropout tower to `tower_dim` (512 there), so every source is
re-expressed at one width before the head mixes them. The parsed fields (unit embedding and
numeric features) form one more tower: they are one "embedding type" of the row.
"""

from __future__ import annotations

import torch
from torch import nn

from pricefuse.core.config import TowersConfig
from pricefuse.models.fusion.heads.base import FusionHeadBase, project, stack


def _tower(in_dim: int, width: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, width), nn.ReLU(), nn.BatchNorm1d(width), nn.Dropout(dropout)
    )


class TowersHead(FusionHeadBase):
    """Knobs: fusion.heads.towers (tower_dim, widths of the MLP head, dropout)."""

    def build(self) -> None:
        opts = self.arch.parse_options(TowersConfig)
        self.unit_embedding = self.new_unit_embedding()
        dims = self._tower_inputs(self.modality_dims())
        self.towers = nn.ModuleDict(
            {name: _tower(dim, opts.tower_dim, opts.dropout) for name, dim in dims.items()}
        )
        self.mlp, width = stack(
            len(dims) * opts.tower_dim,
            opts.widths,
            lambda i, o: nn.Sequential(nn.Linear(i, o), nn.ReLU(), nn.Dropout(opts.dropout)),
        )
        self.out = nn.Linear(width, 1)

    @staticmethod
    def _tower_inputs(dims: dict[str, int]) -> dict[str, int]:
        towers = {"text": dims["text"], "image": dims["image"]}
        towers["tabular"] = dims["unit"] + dims["numeric"]
        if "joint" in dims:
            towers["joint"] = dims["joint"]
        return towers

    def raw(self, parts: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        inputs = {"text": parts["text"], "image": parts["image"]}
        inputs["tabular"] = torch.cat([parts["unit"], parts["numeric"]], dim=-1)
        if "joint" in parts:
            inputs["joint"] = parts["joint"]
        fused = torch.cat(project(self.towers, inputs, mask), dim=-1)
        return self.out(self.mlp(fused)).squeeze(-1)
