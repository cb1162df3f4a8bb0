"""The LLM text block: a frozen decoder LLM's pooled hidden states over a structured template.

Why a decoder as a frozen encoder: a language model has read far more product text than the
22M-parameter sentence encoder, and in the Amazon ML Challenge 2025 frozen LLM embeddings with a
learned head came within about a point of fine-tuning (SPAM_LLMs, Qwen3-Embedding-4B on a
structured template). Nothing is trained here: the block is computed once per row and cached like
the other embeddings, then read by heads that are cheap to train (a ridge, the boosters' PCA, the
neighbour search).

The template puts what carries the price first, so it survives truncation: the item name as
written (digits kept), the value and unit, the pack count, then the first bullets. Pooling reads
one layer's hidden states (`layer`: -1 is the final, normed output; an inner layer is the raw
residual stream) by the mean over real tokens or the last real token (which a causal decoder has
seen everything by); `mean_last` concatenates both.

Inner layers carry a few "massive activation" dimensions thousands of times larger than the rest,
so each pooled vector is standardised by statistics the encoder is given (`Standardiser`,
fitted on train rows, label-free) before any head sees it: without it the cosine of two rows is
the ratio of those few dimensions and every row is every other row's neighbour.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

from pricefuse.core.layout import NAME_AS_WRITTEN

POOLINGS = ("mean", "last", "mean_last")
# The fields of the parsed table the template reads.
BULLETS_KEPT = 2
BULLET_CHARS = 160


def _field(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    return " ".join(str(value).split())


def _number(value: Any) -> str:
    number = pd.to_numeric(value, errors="coerce")
    return "" if pd.isna(number) else f"{float(number):g}"


def _first_bullets(value: Any) -> str:
    if value is None or isinstance(value, float) or value is pd.NA:
        return ""
    items = [value] if isinstance(value, str) else list(value)
    kept = [_field(b)[:BULLET_CHARS] for b in items if _field(b)]
    return "; ".join(kept[:BULLETS_KEPT])


def llm_texts(parsed: pd.DataFrame) -> list[str]:
    """One structured text per parsed row (preprocess's tables and served rows alike):

    Product: <item name as written>
    Size: <value> <unit>
    Pack: <pack>
    Details: <first two bullets, 160 characters each>
    """
    n = len(parsed)

    def column(name: str) -> list[Any]:
        return parsed[name].tolist() if name in parsed.columns else [None] * n

    name_column = NAME_AS_WRITTEN if NAME_AS_WRITTEN in parsed.columns else "item_name"
    names, values, units = column(name_column), column("value"), column("unit")
    packs, bullets = column("pack"), column("bullets")
    out = []
    for i in range(n):
        lines = [f"Product: {_field(names[i])}"]
        size = " ".join(p for p in (_number(values[i]), _field(units[i])) if p)
        if size:
            lines.append(f"Size: {size}")
        lines.append(f"Pack: {_number(packs[i]) or '1'}")
        details = _first_bullets(bullets[i])
        if details:
            lines.append(f"Details: {details}")
        out.append("\n".join(lines))
    return out


@dataclass(frozen=True)
class Variant:
    """Which hidden states one block is read from: a layer (-1 = final) and a pooling."""

    layer: int = -1
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"llm pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @property
    def label(self) -> str:
        return f"{self.pooling}@{'final' if self.layer == -1 else f'layer{self.layer}'}"


class Standardiser:
    """Per-dimension mean and scale of the train rows' vectors, then L2 normalisation: the block
    every consumer reads (dot product = cosine of standardised vectors). Saved as JSON + .npy."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.scale = np.asarray(scale, dtype=np.float32)

    @classmethod
    def fit(cls, rows: np.ndarray) -> Self:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or len(rows) < 2:
            raise ValueError(f"need >= 2 rows of vectors to standardise, got shape {rows.shape}")
        scale = rows.std(axis=0)
        return cls(rows.mean(axis=0), np.where(scale > 1e-6, scale, 1.0))

    def transform(self, rows: np.ndarray) -> np.ndarray:
        z = (np.asarray(rows, dtype=np.float32) - self.mean) / self.scale
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return (z / np.maximum(norms, 1e-6)).astype(np.float32)

    def save(self, directory: Path, stem: str = "llm_standardiser") -> None:
        np.save(directory / f"{stem}_mean.npy", self.mean)
        np.save(directory / f"{stem}_scale.npy", self.scale)

    @classmethod
    def load(cls, directory: Path, stem: str = "llm_standardiser") -> Self:
        return cls(
            np.load(directory / f"{stem}_mean.npy"), np.load(directory / f"{stem}_scale.npy")
        )


class LlmEncoder:
    """A frozen decoder LLM read as an encoder: texts -> pooled hidden states, one array per
    `Variant`, from one forward pass per batch (every layer's states come out of it)."""

    def __init__(self, ref: str, base: Any, tokenizer: Any, max_length: int, batch_size: int):
        if max_length < 2:
            raise ValueError(f"llm max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"llm batch_size must be >= 1, got {batch_size}")
        self.ref = ref
        self.base = base
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.n_layers = int(base.config.num_hidden_layers)
        self.dim = int(base.config.hidden_size)
        self.texts_per_second = float("nan")

    @classmethod
    def from_ref(
        cls, ref: str, max_length: int = 64, batch_size: int = 16, device: str = "auto"
    ) -> LlmEncoder:
        """Load `pkg:`/`hf:`/path (pricefuse.core.sources) in float32, frozen, on `device`."""
        import torch

        from pricefuse.core.device import resolve_device
        from pricefuse.core.sources import resolve
        from pricefuse.features.decoder import load_decoder_base, prepare_tokenizer

        base, tokenizer = load_decoder_base(resolve(ref), torch.float32)
        base.requires_grad_(False)
        base.eval().to(torch.device(resolve_device(device, "embed.device")))
        return cls(ref, base, prepare_tokenizer(tokenizer), max_length, batch_size)

    def layer_index(self, layer: int) -> int:
        """`layer` (-1 = final, 1..n or -n..-1) as an index into the decoder's hidden states; a
        ValueError naming the bounds for a layer the model does not have."""
        # hidden_states holds the embeddings then one entry per layer: n_layers + 1 in all.
        index = self.n_layers + 1 + layer if layer < 0 else layer
        if not 1 <= index <= self.n_layers:
            raise ValueError(f"llm layer {layer} is outside 1..{self.n_layers} (or -1..-n)")
        return index

    def encode(
        self, texts: Sequence[str], variants: Sequence[Variant], progress: bool = False
    ) -> list[np.ndarray]:
        """Each variant's (n, dim or 2*dim) float32 vectors, rows in input order. Batches are
        formed longest first, so each pads to similar lengths; the rate is kept in
        `texts_per_second`."""
        import torch
        from tqdm import tqdm

        from pricefuse.core.device import autocast_dtype
        from pricefuse.features.decoder import pool

        texts = list(texts)
        if not variants:
            raise ValueError("no llm variant to encode")
        indices = [self.layer_index(v.layer) for v in variants]
        widths = [2 * self.dim if v.pooling == "mean_last" else self.dim for v in variants]
        out = [np.zeros((len(texts), w), dtype=np.float32) for w in widths]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        device = next(self.base.parameters()).device
        half = autocast_dtype(device.type)
        started = time.perf_counter()
        bar = tqdm(total=len(texts), unit="text", desc="llm", disable=None if progress else True)
        with bar, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in index],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(device)
                mask = batch["attention_mask"]
                context = (
                    torch.autocast("cuda", dtype=half)
                    if half is not None
                    else contextlib.nullcontext()
                )
                with context:
                    hidden = self.base(
                        input_ids=batch["input_ids"],
                        attention_mask=mask,
                        output_hidden_states=True,
                        use_cache=False,
                    ).hidden_states
                for array, variant, layer in zip(out, variants, indices, strict=True):
                    states = hidden[layer].float()
                    poolings = (
                        ("mean", "last") if variant.pooling == "mean_last" else (variant.pooling,)
                    )
                    pooled = torch.cat([pool(states, mask, p) for p in poolings], dim=1)
                    array[index] = pooled.cpu().numpy()
                bar.update(len(index))
        elapsed = time.perf_counter() - started
        self.texts_per_second = len(texts) / elapsed if elapsed > 0 else float("nan")
        return out


def write_block_meta(directory: Path, meta: dict[str, Any]) -> None:
    (directory / "llm.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
