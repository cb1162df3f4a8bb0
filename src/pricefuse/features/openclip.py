"""open_clip models by reference: `open_clip:<name>`, image and text vectors in one space.

Why a reference of its own: Marqo's e-commerce embeddings (`Marqo/marqo-ecommerce-embeddings-B`
/ `-L`, trained on product titles and images) and the LAION CLIPs are open_clip checkpoints
(`open_clip_config.json` + `open_clip_pytorch_model.bin`), which transformers cannot read. The
name after `open_clip:` is what `open_clip.create_model` takes:
- `open_clip:hf-hub:Marqo/marqo-ecommerce-embeddings-B` (the hub; open_clip downloads and caches);
- `open_clip:local-dir:/path/to/dir` (such a checkpoint on disk, e.g. copied for offline use);
- `open_clip:ViT-B-32@laion2b_s34b_b79k` (a built-in architecture with a pretrained tag or a
  weights file after `@`).
Pretrained weights are required (`require_pretrained`): a built-in architecture without them
would embed noise without any error.

open_clip is imported only for these references, so the default pipeline does not need it. It
imports torchvision, hence `compat.apply()` first. One model object serves both encoders of a run
(`load` is cached): image and text towers live in one module, and a second copy of a 0.2-0.7 B
parameter model would only cost memory.

Text is tokenised at the model's own context length (77 for CLIP, 64 for the SigLIP-based Marqo
models): open_clip tokenizers always pad to it, as the models were trained.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from pricefuse.core import compat
from pricefuse.core.sources import ModelSourceError

PREFIX = "open_clip:"
INSTALL = "pip install open-clip-torch"
Stats = tuple[float, float, float]


def is_open_clip(ref: str) -> bool:
    return ref.strip().startswith(PREFIX)


def _import_open_clip() -> Any:
    compat.apply()  # open_clip imports torchvision
    try:
        import open_clip
    except ImportError as exc:
        raise ModelSourceError(
            f"open_clip: references need the open_clip package: `{INSTALL}` ({exc})"
        ) from exc
    return open_clip


def _split(ref: str) -> tuple[str, str | None]:
    """(model name, pretrained tag or file) of an `open_clip:` reference."""
    name = ref.strip()[len(PREFIX) :].strip()
    if not name:
        raise ModelSourceError(f"{ref!r} names no model: e.g. {PREFIX}hf-hub:<org>/<repo>")
    if name.startswith(("hf-hub:", "local-dir:")) or "@" not in name:
        return name, None  # a schema carries its own weights; `pretrained` would be ignored
    arch, pretrained = name.split("@", 1)
    return arch, pretrained


@dataclass(frozen=True)
class OpenClip:
    """A loaded open_clip model with its tokenizer and image normalisation."""

    ref: str
    model: Any
    tokenizer: Any
    mean: Stats
    std: Stats
    image_size: int


@functools.lru_cache(maxsize=1)
def load(ref: str) -> OpenClip:
    """The open_clip model `ref` names, with pretrained weights (eval mode, CPU)."""
    open_clip = _import_open_clip()
    name, pretrained = _split(ref)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # hub errors, missing files, unknown names, bad checkpoints
        raise ModelSourceError(
            f"cannot load the open_clip model {ref!r} ({type(exc).__name__}: {exc}); offline? "
            "use open_clip:local-dir:<path> with the checkpoint on disk"
        ) from exc
    visual = model.visual
    size = visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    return OpenClip(
        ref, model.eval(), tokenizer, tuple(visual.image_mean), tuple(visual.image_std), int(size)
    )


class OpenClipVision(torch.nn.Module):
    """Pixels -> `encode_image` (not normalised, like every image feature here)."""

    def __init__(self, model: Any, native_size: int) -> None:
        super().__init__()
        self.model = model
        self.native_size = native_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.native_size:  # open_clip does not interpolate positions
            raise ValueError(
                f"this open_clip model takes {self.native_size}x{self.native_size} images: "
                f"set embed.image_size: {self.native_size}"
            )
        return self.model.encode_image(pixels)


def vision_backbone(ref: str) -> tuple[torch.nn.Module, Stats, Stats]:
    """(image embedder, mean, std) of an `open_clip:` reference, for `ImageEncoder`."""
    loaded = load(ref)
    return OpenClipVision(loaded.model, loaded.image_size).eval(), loaded.mean, loaded.std


class OpenClipTextTower:
    """The `TextTower` (pricefuse.features.text) of an open_clip model: `encode_text`."""

    fixed_length = True

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.limit = int(tokenizer.context_length)
        with torch.inference_mode():
            self.dim = int(model.encode_text(tokenizer([""])).shape[1])

    def embed(self, batch: list[str], max_length: int) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(batch, context_length=max_length).to(device))


def text_tower(ref: str) -> OpenClipTextTower:
    loaded = load(ref)
    return OpenClipTextTower(loaded.model, loaded.tokenizer)
