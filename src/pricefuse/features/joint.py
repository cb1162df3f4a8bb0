"""CLIP and SigLIP towers from a transformers directory: image and text vectors in one space.

A contrastive image-text model embeds both modalities into one space, which is what a joint
tower (fusing text and image vectors by addition) needs; the text vectors must then come from
the *same* checkpoint as the image vectors (`embed.text_model == embed.image_model`).

The two families differ only in names and a few conventions, so one table (`FAMILIES`) drives one
loader for both towers of both families:
- CLIP (`openai/clip-vit-*`): `CLIPVisionModelWithProjection.image_embeds` and
  `CLIPTextModelWithProjection.text_embeds`; the text tower pools at the end-of-text token under a
  causal mask, so padding after it changes nothing and any length up to 77 tokens works.
- SigLIP (`google/siglip-*`): transformers 5 has no `*WithProjection` class; the image embedding
  is `SiglipVisionModel.pooler_output` (the attention-pooling head) and the text embedding
  `SiglipTextModel.pooler_output` (the last position through `head`): exactly what
  `SiglipModel.get_image_features` / `get_text_features` return. SigLIP was trained with every
  text padded to the full length (64) and no attention mask, and pools the *last* position, so
  texts are padded with `padding="max_length"` and only `input_ids` are passed (as the model card
  and transformers' docs prescribe); any other padding embeds a different position.

A checkpoint that lacks weights for the tower is refused: transformers would fill them with random
numbers and the embeddings would be noise without any error.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pricefuse.core import compat
from pricefuse.core.sources import ModelSourceError, ResolvedModel

Stats = tuple[float, float, float]


@dataclass(frozen=True)
class Tower:
    """One tower of a family: transformers class names (imported lazily) and its output."""

    model_type: str  # model_type of a checkpoint holding only this tower
    config_class: str
    model_class: str
    config_key: str  # where a full checkpoint's config keeps this tower's config
    output: str  # the model output field holding the embedding
    width: str  # the tower config's attribute giving the embedding width


@dataclass(frozen=True)
class Family:
    """A contrastive image-text model family as transformers implements it."""

    name: str
    model_type: str  # model_type of a full (both towers) checkpoint
    config_class: str
    vision: Tower
    text: Tower
    # A full CLIP checkpoint keeps projection_dim at the top level only; a tower config taken from
    # it falls back to 512 and would refuse (or re-initialise) the projection.
    shared_keys: tuple[str, ...]
    text_inputs: tuple[str, ...]  # tokenizer outputs the text tower was trained with
    fixed_text_length: bool  # every text padded to the full length, as trained
    mean: Stats  # image normalisation when the directory has no preprocessor_config.json
    std: Stats

    def tower(self, which: str) -> Tower:
        return {"vision": self.vision, "text": self.text}[which]


FAMILIES = {
    "clip": Family(
        name="CLIP",
        model_type="clip",
        config_class="CLIPConfig",
        vision=Tower(
            "clip_vision_model",
            "CLIPVisionConfig",
            "CLIPVisionModelWithProjection",
            "vision_config",
            "image_embeds",
            "projection_dim",
        ),
        text=Tower(
            "clip_text_model",
            "CLIPTextConfig",
            "CLIPTextModelWithProjection",
            "text_config",
            "text_embeds",
            "projection_dim",
        ),
        shared_keys=("projection_dim",),
        text_inputs=("input_ids", "attention_mask"),
        fixed_text_length=False,
        mean=(0.48145466, 0.4578275, 0.40821073),  # OPENAI_CLIP_MEAN / _STD
        std=(0.26862954, 0.26130258, 0.27577711),
    ),
    "siglip": Family(
        name="SigLIP",
        model_type="siglip",
        config_class="SiglipConfig",
        vision=Tower(
            "siglip_vision_model",
            "SiglipVisionConfig",
            "SiglipVisionModel",
            "vision_config",
            "pooler_output",
            "hidden_size",
        ),
        text=Tower(
            "siglip_text_model",
            "SiglipTextConfig",
            "SiglipTextModel",
            "text_config",
            "pooler_output",
            "projection_size",
        ),
        shared_keys=(),
        text_inputs=("input_ids",),
        fixed_text_length=True,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
}
_BY_MODEL_TYPE = {
    model_type: family
    for family in FAMILIES.values()
    for model_type in (family.model_type, family.vision.model_type, family.text.model_type)
}


def model_type_of(directory: Path) -> str | None:
    """The directory's config.json model_type, or None without one."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")


def family_of(directory: Path) -> Family | None:
    """The CLIP/SigLIP family of a model directory (full or one-tower checkpoint), else None."""
    return _BY_MODEL_TYPE.get(model_type_of(directory) or "")


@contextlib.contextmanager
def _other_tower_unreported() -> Iterator[None]:
    """Silence transformers' load report while one tower loads from a full checkpoint.

    The report lists every weight of the other tower as UNEXPECTED (hundreds of lines for a real
    CLIP), which is by construction; the keys that matter, the missing ones, are checked here.
    """
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_tower(resolved: ResolvedModel, which: str) -> Any:
    """The `which` ("vision" | "text") tower of the CLIP/SigLIP checkpoint at `resolved`, eval mode.

    Reads a full checkpoint (both towers) or a checkpoint of that tower alone; refuses the other
    tower's checkpoint and any checkpoint with weights missing for the tower.
    """
    compat.apply()  # transformers imports torchvision when it is installed
    import transformers

    model_type = model_type_of(resolved.path) or ""
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise ModelSourceError(f"{resolved.ref!r} is not a CLIP or SigLIP directory")
    tower = family.tower(which)
    if model_type not in (family.model_type, tower.model_type):
        raise ModelSourceError(
            f"{resolved.ref!r} holds a {model_type} checkpoint: it has no {which} tower; use the "
            f"full {family.name} checkpoint (model_type {family.model_type!r})"
        )
    path = str(resolved.path)
    try:
        if model_type == family.model_type:
            full = getattr(transformers, family.config_class).from_pretrained(path)
            config = getattr(full, tower.config_key)
            for key in family.shared_keys:
                setattr(config, key, getattr(full, key))
        else:
            config = getattr(transformers, tower.config_class).from_pretrained(path)
        with _other_tower_unreported():
            model, info = getattr(transformers, tower.model_class).from_pretrained(
                path, config=config, output_loading_info=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelSourceError(
            f"cannot load the {family.name} {which} tower from {resolved.path} "
            f"({resolved.ref!r}): {exc}"
        ) from exc
    if info.get("missing_keys"):  # random weights would embed noise without any error
        missing = sorted(info["missing_keys"])
        raise ModelSourceError(f"{resolved.ref!r}: {family.name} weights missing for {missing[:5]}")
    if which == "vision" and not getattr(config, "vision_use_head", True):
        raise ModelSourceError(f"{resolved.ref!r}: this SigLIP vision tower has no pooling head")
    return model.eval()


def image_stats(directory: Path, family: Family) -> tuple[Stats, Stats]:
    """Mean/std of the checkpoint's image processor, else the family's published defaults."""
    processor_file = directory / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    return (
        tuple(processor.get("image_mean", family.mean)),
        tuple(processor.get("image_std", family.std)),
    )


class VisionEmbedder(torch.nn.Module):
    """Pixels (B, 3, H, W) -> the family's image embedding (B, dim); other sizes interpolate the
    position embeddings (both families support it)."""

    def __init__(self, model: Any, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.native_size = int(model.config.image_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        interpolate = pixels.shape[-1] != self.native_size
        output = self.model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
        return getattr(output, self.output)


def vision_backbone(resolved: ResolvedModel) -> tuple[torch.nn.Module, Stats, Stats]:
    """(image embedder, mean, std) of a CLIP/SigLIP directory, for `ImageEncoder`."""
    family = family_of(resolved.path)
    if family is None:
        raise ModelSourceError(f"{resolved.ref!r} is not a CLIP or SigLIP directory")
    model = load_tower(resolved, "vision")
    mean, std = image_stats(resolved.path, family)
    return VisionEmbedder(model, family.vision.output).eval(), mean, std


class JointTextTower:
    """A CLIP/SigLIP text tower and its tokenizer: texts -> embeddings in the image space.

    The `TextTower` of `pricefuse.features.text` for joint models; `TextEncoder` batches, orders
    and L2-normalises.
    """

    def __init__(self, model: Any, tokenizer: Any, family: Family) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.dim = int(getattr(model.config, family.text.width))
        self.limit = int(model.config.max_position_embeddings)
        self.fixed_length = family.fixed_text_length

    def embed(self, batch: list[str], max_length: int) -> torch.Tensor:
        tokens = self.tokenizer(
            batch,
            padding="max_length" if self.fixed_length else True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        inputs = {key: tokens[key].to(device) for key in self.family.text_inputs if key in tokens}
        return getattr(self.model(**inputs), self.family.text.output)


def text_tower(resolved: ResolvedModel) -> JointTextTower:
    """The text tower + tokenizer of a full CLIP/SigLIP directory."""
    compat.apply()
    from transformers import AutoTokenizer

    family = family_of(resolved.path)
    if family is None:
        raise ModelSourceError(f"{resolved.ref!r} is not a CLIP or SigLIP directory")
    model = load_tower(resolved, "text")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        # ImportError: SigLIP's SentencePiece tokenizer needs `pip install sentencepiece`.
        raise ModelSourceError(
            f"cannot load the {family.name} tokenizer from {resolved.path} ({resolved.ref!r}): "
            f"{exc}"
        ) from exc
    return JointTextTower(model, tokenizer, family)
