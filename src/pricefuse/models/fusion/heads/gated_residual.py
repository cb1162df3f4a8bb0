"""`gated_residual`: a gated residual MLP over text, image, unit and numeric features.

Why this shape (the LORAverse write-up, Amazon ML Challenge 2025): the frozen encoders already
carry most of the signal, so the head only has to weigh modalities against each other and learn
a smooth correction on top. Each modality is projected to a common width, a sigmoid gate per
modality (computed from all projected modalities together) decides how much it contributes for
this row, and a few pre-norm residual blocks refine the fused vector.

A row without an image: its image branch output is replaced by zeros before the gate network
sees it, so its image contribution is gate * 0 = 0, not even the branch's biases.

Parameter names and their creation order are those of the former `pricefuse.models.fusion.
FusionHead`: its saved state dicts load, and a seed gives the same initial weights.
"""

from __future__ import annotations

import torch
from torch import nn

from pricefuse.models.fusion.heads.base import FusionHeadBase, keep_image


def _projection(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """Inputs arrive standardised per dimension (see FusionHeadBase.set_input_scale)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
    )


class ResidualBlock(nn.Module):
    """Pre-norm MLP block with a skip connection: deep enough to model interactions, while the
    identity path keeps the optimisation as easy as a linear model's at the start."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(hidden),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class GatedResidualHead(FusionHeadBase):
    """LORAverse's head; width `hidden`, `n_blocks` residual blocks, `dropout` (params.yaml
    `fusion.heads.gated_residual`, kept in HeadArch's own fields of those names)."""

    def build(self) -> None:
        arch, h = self.arch, self.arch.hidden
        self.text_proj = _projection(arch.text_dim, h, arch.dropout)
        self.image_proj = _projection(arch.image_dim, h, arch.dropout)
        self.unit_embedding = self.new_unit_embedding()
        self.unit_proj = nn.Sequential(nn.Linear(arch.unit_dim, h), nn.GELU())
        self.numeric_proj = _projection(arch.n_numeric, h, 0.0)
        if arch.joint_dim:
            self.joint_proj = _projection(arch.joint_dim, h, arch.dropout)
        n_parts = len(self.modality_dims())
        self.gate = nn.Linear(n_parts * h, n_parts)
        # Concatenate the gated parts, then mix: keeps modality identity that a plain sum of the
        # gated parts would lose (the sum measured ~1 SMAPE point worse on synthetic data).
        self.fuse = nn.Linear(n_parts * h, h)
        self.blocks = nn.ModuleList(ResidualBlock(h, arch.dropout) for _ in range(arch.n_blocks))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, 1))

    def gated(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        unit: torch.Tensor,
        numeric: torch.Tensor,
        joint: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused hidden vector, gates (n, modalities) in MODALITIES order) — gates exposed for
        analysis."""
        return self._gated(*self.prepare(text, image, image_mask, unit, numeric, joint))

    def _gated(
        self, parts: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        projected = [
            self.text_proj(parts["text"]),
            keep_image(mask, self.image_proj(parts["image"])),
            self.unit_proj(parts["unit"]),
            self.numeric_proj(parts["numeric"]),
        ]
        if self.arch.joint_dim:
            projected.append(self.joint_proj(parts["joint"]))
        gates = torch.sigmoid(self.gate(torch.cat(projected, dim=-1)))
        gated = [part * gates[:, i : i + 1] for i, part in enumerate(projected)]
        return self.fuse(torch.cat(gated, dim=-1)), gates

    def raw(self, parts: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        x, _ = self._gated(parts, mask)
        for block in self.blocks:
            x = block(x)
        return self.out(x).squeeze(-1)
