"""What every fusion head shares: its saved architecture, input standardisation, the image-mask
rule and the readout. A head module adds only its body (`raw`).

Input standardisation: embeddings are standardised per dimension with training statistics
(buffers, so they travel with the state dict). Why not a LayerNorm on the inputs: it divides out
each row's embedding norm, which carries signal (CNN pooled features, and any encoder whose
outputs are not unit-normalised).

Missing images: the image vector is replaced by zeros where the row's image mask is off, with
`torch.where` (0 * NaN is NaN, and a masked row's image vector may hold anything), before any
head sees it, and each head removes the image branch's own output for those rows
(`keep_image`), so a row without an image takes exactly the text-only path. Serving relies on
this: a broken image link falls back to the path the model was trained with.

Readout (`HeadArch.output`): `affine` = `target_mean + target_std * raw`, so the network sees
well-conditioned targets from the first step; `sigmoid` = `lo + (hi - lo) * sigmoid(raw)` with
lo/hi the training targets' min/max, the range a MinMax-scaled target with BCE (SPAM_LLMs)
works in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from pricefuse.core.config import section_from_dict

OUTPUTS = ("affine", "sigmoid")
# Modality order of `FusionHeadBase.prepare` (joint only with the joint tower).
MODALITIES = ("text", "image", "unit", "numeric", "joint")

T = TypeVar("T")


@dataclass(frozen=True)
class HeadArch:
    """Everything needed to rebuild a head: saved next to the weights of each fold.

    Fields after `unit_dim` were added with the other heads; their defaults are what a format-1
    manifest (the gated residual head only) meant. The chosen head's own knobs (params.yaml
    `fusion.heads.<arch>`) are in `options`, except gated_residual's: `hidden` / `n_blocks` /
    `dropout` here, where every saved manifest has them (its `options` stay empty; the other
    heads leave these three at their defaults and never read them).
    """

    text_dim: int
    image_dim: int
    n_units: int
    n_numeric: int
    hidden: int = 256
    n_blocks: int = 2
    dropout: float = 0.15
    unit_dim: int = 32
    arch: str = "gated_residual"
    output: str = "affine"
    joint_dim: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            known = ", ".join(OUTPUTS)
            raise ValueError(f"fusion.output must be one of {known}, got {self.output!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> HeadArch:
        return cls(**raw)

    def parse_options(self, schema: type[T]) -> T:
        """The head's knobs typed and checked against their params.yaml schema (a manifest's
        JSON lists become tuples; a missing or unknown knob is a ConfigError naming it)."""
        return section_from_dict(
            schema, self.options, where=f"fusion.heads.{self.arch}", source="the head's arch"
        )


def keep_image(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` on rows with an image, exactly 0 elsewhere (mask (n, 1), value (n, ...))."""
    while mask.dim() < value.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, value, 0.0)


def project(
    layers: nn.ModuleDict, parts: Mapping[str, torch.Tensor], mask: torch.Tensor
) -> list[torch.Tensor]:
    """Each modality through its own layer, in `parts` order; the image branch's output is kept
    only on rows with an image (exactly 0 elsewhere, not the branch's biases)."""
    out = []
    for name, x in parts.items():
        y = layers[name](x)
        out.append(keep_image(mask, y) if name == "image" else y)
    return out


class FusionHeadBase(nn.Module, ABC):
    """Regresses log1p(price) from (text, image, image_mask, unit index, numeric, joint).

    Subclasses build their layers in `build` (called from here, so the unit embedding gets its
    small initialisation after every layer exists) and compute the raw output in `raw`.
    """

    def __init__(self, arch: HeadArch) -> None:
        super().__init__()
        self.arch = arch
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        if arch.output == "sigmoid":
            self.register_buffer("target_lo", torch.zeros(()))
            self.register_buffer("target_hi", torch.ones(()))
        for name, dim in (("text", arch.text_dim), ("image", arch.image_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        if arch.joint_dim:
            self.register_buffer("joint_mean", torch.zeros(arch.joint_dim))
            self.register_buffer("joint_std", torch.ones(arch.joint_dim))
        self.unit_embedding: nn.Embedding
        self.build()
        # Embeddings start small so an unseen/rare unit (index 0) starts near "no information"
        # rather than at a random N(0, 1) point the rest of the network never saw.
        nn.init.normal_(self.unit_embedding.weight, std=0.02)

    @abstractmethod
    def build(self) -> None:
        """Create the layers, `self.unit_embedding` (see `new_unit_embedding`) among them."""

    @abstractmethod
    def raw(self, parts: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Raw output (n,) from `prepare`'s parts; mask (n, 1) bool = row has an image."""

    def new_unit_embedding(self) -> nn.Embedding:
        return nn.Embedding(self.arch.n_units, self.arch.unit_dim)

    def modality_dims(self) -> dict[str, int]:
        """Input width per modality in MODALITIES order, as `prepare` returns them."""
        dims = {
            "text": self.arch.text_dim,
            "image": self.arch.image_dim,
            "unit": self.arch.unit_dim,
            "numeric": self.arch.n_numeric,
        }
        if self.arch.joint_dim:
            dims["joint"] = self.arch.joint_dim
        return dims

    def set_target_scale(
        self, mean: float, std: float, lo: float | None = None, hi: float | None = None
    ) -> None:
        """Centre the output on the training targets (called once before training a fold);
        lo/hi (the targets' min/max) are required by the sigmoid readout."""
        self.target_mean.fill_(float(mean))
        self.target_std.fill_(max(float(std), 1e-3))
        if self.arch.output == "sigmoid":
            if lo is None or hi is None:
                raise ValueError("the sigmoid readout needs the training targets' min and max")
            self.target_lo.fill_(float(lo))
            self.target_hi.fill_(max(float(hi), float(lo) + 1e-3))

    @torch.no_grad()
    def set_input_scale(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        mask: torch.Tensor,
        joint: torch.Tensor | None = None,
    ) -> None:
        """Per-dimension embedding statistics of the training rows (image: rows with an image)."""
        self.text_mean.copy_(text.mean(0))
        self.text_std.copy_(text.std(0, unbiased=False).clamp_min(1e-6))
        with_image = image[mask.bool()]
        if len(with_image) > 1:
            self.image_mean.copy_(with_image.mean(0))
            self.image_std.copy_(with_image.std(0, unbiased=False).clamp_min(1e-6))
        if self.arch.joint_dim:
            joint = self._checked_joint(joint)
            self.joint_mean.copy_(joint.mean(0))
            self.joint_std.copy_(joint.std(0, unbiased=False).clamp_min(1e-6))

    def prepare(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        unit: torch.Tensor,
        numeric: torch.Tensor,
        joint: torch.Tensor | None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(standardised inputs per modality, mask (n, 1)). The image is exactly 0 on masked
        rows; zeroing the input (not just the branch) also keeps NaNs out of the backward pass."""
        mask = image_mask.bool().unsqueeze(-1)
        parts = {
            "text": (text - self.text_mean) / self.text_std,
            "image": torch.where(mask, (image - self.image_mean) / self.image_std, 0.0),
            "unit": self.unit_embedding(unit),
            "numeric": numeric,
        }
        if self.arch.joint_dim:
            parts["joint"] = (self._checked_joint(joint) - self.joint_mean) / self.joint_std
        return parts, mask

    def _checked_joint(self, joint: torch.Tensor | None) -> torch.Tensor:
        """The joint embedding a head built with a joint tower needs, of its width."""
        if joint is None or joint.shape[-1] != self.arch.joint_dim:
            raise ValueError(f"this head takes a joint embedding of {self.arch.joint_dim} dims")
        return joint

    def readout(self, raw: torch.Tensor) -> torch.Tensor:
        """log1p price from the raw output (see the module docstring)."""
        if self.arch.output == "sigmoid":
            return self.target_lo + (self.target_hi - self.target_lo) * torch.sigmoid(raw)
        return self.target_mean + self.target_std * raw

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        unit: torch.Tensor,
        numeric: torch.Tensor,
        joint: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log1p price per row; arguments in `FusionInputs.features` order."""
        parts, mask = self.prepare(text, image, image_mask, unit, numeric, joint)
        return self.readout(self.raw(parts, mask))


def stack(
    in_dim: int, widths: Sequence[int], block: Callable[[int, int], nn.Module]
) -> tuple[nn.Sequential, int]:
    """`block(in, out)` per width, chained; returns (layers, output width). An empty `widths`
    is the identity (the next layer reads the input directly)."""
    layers = []
    for width in widths:
        layers.append(block(in_dim, width))
        in_dim = width
    return nn.Sequential(*layers), in_dim
