"""The fusion heads, one module each, chosen by `fusion.arch` (docs/models.md, fusion heads).

Every head shares the inputs (pricefuse.models.fusion.inputs), the training loop
(pricefuse.models.fusion.training), persistence (pricefuse.models.fusion.predictor) and, from
`base`, input standardisation, the image-mask rule and the readout. A new head is one module
and one entry in HEADS.
"""

from __future__ import annotations

from pricefuse.models.fusion.heads.base import OUTPUTS, FusionHeadBase, HeadArch
from pricefuse.models.fusion.heads.cross_attention import CrossAttentionHead
from pricefuse.models.fusion.heads.dcn import DcnHead
from pricefuse.models.fusion.heads.gated_residual import GatedResidualHead
from pricefuse.models.fusion.heads.projection_mlp import ProjectionMlpHead
from pricefuse.models.fusion.heads.towers import TowersHead

HEADS: dict[str, type[FusionHeadBase]] = {
    "gated_residual": GatedResidualHead,
    "projection_mlp": ProjectionMlpHead,
    "towers": TowersHead,
    "dcn": DcnHead,
    "cross_attention": CrossAttentionHead,
}


def build_head(arch: HeadArch) -> FusionHeadBase:
    """A freshly initialised head of `arch.arch` (ValueError naming the known ones)."""
    if arch.arch not in HEADS:
        raise ValueError(f"unknown fusion.arch {arch.arch!r}; known: {', '.join(sorted(HEADS))}")
    return HEADS[arch.arch](arch)


__all__ = ["HEADS", "OUTPUTS", "FusionHeadBase", "HeadArch", "build_head"]
