"""The text regressor's rows: a template over parsed fields -> token ids -> padded batches.

Why a template over parsed fields and not the raw catalog text: the fields that carry the price
(name, quantity with its unit, pack count) come first and survive truncation to a few dozen
tokens, while the long bullets and description follow (`text.template` in params.yaml).

Rows are tokenized once (no padding) and padded per batch to the batch's longest row, on the
right: `pool_hidden`'s `last` pooling relies on it. Prediction batches are formed from rows sorted
by length, so each pads to similar lengths.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

# Parsed-table fields a template may name (pricefuse.data.catalog.parse_frame columns).
TEMPLATE_FIELDS = (
    "item_name",
    "value",
    "unit",
    "unit_raw",
    "pack",
    "bullets",
    "description",
    "text",
)
BULLET_SEPARATOR = " ; "
# Tokenizers without a real limit report this sentinel-sized model_max_length.
_NO_LIMIT = 1_000_000


def template_fields(template: str) -> list[str]:
    """The fields `template` names, checked against TEMPLATE_FIELDS."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"text.template {template!r} is not a format string: {exc}") from exc
    unknown = sorted({n for n in names if n not in TEMPLATE_FIELDS})
    if unknown or any(not n for n in names):
        raise ValueError(
            f"text.template names unknown field(s) {unknown or ['{}']}; "
            f"known: {', '.join(TEMPLATE_FIELDS)}"
        )
    if not names:
        raise ValueError(f"text.template {template!r} names no field")
    return names


def _bullets(value: Any) -> str:
    if value is None or isinstance(value, float):
        return ""
    if isinstance(value, str):
        return value
    return BULLET_SEPARATOR.join(str(b) for b in value if str(b).strip())


def _number(value: Any) -> str:
    number = pd.to_numeric(value, errors="coerce")
    return "" if pd.isna(number) else f"{float(number):g}"


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def render_texts(parsed: pd.DataFrame, template: str) -> list[str]:
    """One string per parsed row: the template filled in (missing fields empty), whitespace
    collapsed. Works on preprocess's tables and on parse_frame's output at serving time."""
    names = template_fields(template)
    n = len(parsed)
    columns: dict[str, list[str]] = {}
    for name in set(names):
        raw = parsed[name].tolist() if name in parsed.columns else [None] * n
        if name == "bullets":
            columns[name] = [_bullets(v) for v in raw]
        elif name == "value":
            columns[name] = [_number(v) for v in raw]
        elif name == "pack":
            columns[name] = [_number(v) or "1" for v in raw]
        else:
            columns[name] = [_text(v) for v in raw]
    return [
        " ".join(template.format(**{k: v[i] for k, v in columns.items()}).split()) for i in range(n)
    ]


def effective_max_length(tokenizer: Any, max_length: int) -> int:
    """`max_length`, capped at what the model's positions allow (a longer input would crash)."""
    if max_length < 2:
        raise ValueError(f"text.max_length must be >= 2, got {max_length}")
    limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    return min(max_length, limit) if 0 < limit < _NO_LIMIT else max_length


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text (special tokens added, truncated, unpadded)."""
    if not texts:
        return []
    length = effective_max_length(tokenizer, max_length)
    return tokenizer(list(texts), truncation=True, max_length=length)["input_ids"]


def pad_id(tokenizer: Any) -> int:
    """The padding token id (decoders often have none: their EOS, else 0). Padded positions are
    masked, so the value only has to be a valid id."""
    for candidate in (tokenizer.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


class TokenRows(Dataset):
    """Rows as (token ids, target, row position); target NaN for rows without one."""

    def __init__(
        self, ids: Sequence[Sequence[int]], rows: np.ndarray, target: np.ndarray | None = None
    ) -> None:
        self.ids = ids
        self.rows = np.asarray(rows, dtype=np.int64)
        self.target = None if target is None else np.asarray(target, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Sequence[int], float, int]:
        row = int(self.rows[i])
        target = float("nan") if self.target is None else float(self.target[row])
        return self.ids[row], target, row


class PadCollate:
    """Batch of TokenRows items -> input_ids / attention_mask (right-padded), target, row."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, items: list[tuple[Sequence[int], float, int]]) -> dict[str, torch.Tensor]:
        width = max((len(ids) for ids, _, _ in items), default=1) or 1
        input_ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (ids, _, _) in enumerate(items):
            input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "target": torch.tensor([t for _, t, _ in items], dtype=torch.float32),
            "row": torch.tensor([r for _, _, r in items], dtype=torch.long),
        }


class EpochShuffle(Sampler[int]):
    """A new permutation each epoch, from (seed, epoch) alone: every process draws the same order
    (accelerate then shards it) and a resumed run repeats it. accelerate's prepared dataloader
    calls `set_epoch` with its iteration count before each pass."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        return iter(rng.permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def by_length(ids: Sequence[Sequence[int]], rows: np.ndarray) -> np.ndarray:
    """`rows` sorted by token count, longest first (stable): prediction batches pad little."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.fromiter((len(ids[r]) for r in rows), dtype=np.int64, count=len(rows))
    return rows[np.argsort(-lengths, kind="stable")]
