"""Text backbones by reference: what the fine-tuned text regressor trains, behind one interface.

A backbone is a pretrained transformer that turns token ids into one pooled vector per row, plus
what a fold must save to rebuild it. Two kinds share the interface (`TextBackbone`):
- `encoder`: an encoder model (MiniLM offline by default, any hub encoder online) fine-tuned end
  to end; a fold saves all its weights.
- `decoder_lora`: a decoder LLM with LoRA adapters (peft), built by
  `pricefuse.models.text.decoder_lora.load_decoder_lora`; base weights stay referenced
  (`hf:`/`pkg:`/
  path) and a fold saves the adapters only.

`load_backbone(cfg)` dispatches on `text.kind`. Pooling (`pool_hidden`) is shared: mean over real
tokens, the first token (`cls`), or the last real token (`last`, what a causal decoder has seen
everything by). Padding is on the right (pricefuse.models.text.data pads that way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from pricefuse.features.text import load_transformer
from pricefuse.models.text.precision import choose_precision, cuda_capability

if TYPE_CHECKING:
    from pricefuse.core.config import TextConfig

KINDS = ("encoder", "decoder_lora")
POOLINGS = ("mean", "cls", "last")


class TextBackbone(Protocol):
    """A pretrained text model, trainable, that pools token ids into (batch, dim) vectors."""

    ref: str
    dim: int
    tokenizer: Any  # a Hugging Face tokenizer
    module: torch.nn.Module  # module(input_ids, attention_mask) -> (batch, dim) pooled vectors

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a fold saves (encoder: every weight; LoRA: the adapters only), on CPU."""
        ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def reinit_trainable(self, seed: int) -> None:
        """Redraw the randomly initialised part of the trainable state from `seed`, on the CPU
        whatever the device (encoder: none, every weight is pretrained; LoRA: the adapters)."""
        ...

    def set_frozen(self, frozen: bool) -> None:
        """Stop (or resume) training the backbone: the frozen first epochs train the head only."""
        ...


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, dim) hidden states + (batch, seq) attention mask -> (batch, dim)."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = (mask.sum(dim=1) - 1).clamp(min=0).long()
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")


class PooledEncoder(torch.nn.Module):
    """A transformers encoder + pooling: (input_ids, attention_mask) -> (batch, dim)."""

    def __init__(self, model: torch.nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
        self.model = model
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_hidden(hidden, attention_mask, self.pooling)


class EncoderBackbone:
    """An encoder fine-tuned end to end: its trainable state is every weight."""

    def __init__(self, ref: str, model: torch.nn.Module, tokenizer: Any, pooling: str) -> None:
        self.ref = ref
        self.tokenizer = tokenizer
        self.module = PooledEncoder(model, pooling)
        self.dim = int(model.config.hidden_size)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().to("cpu", copy=True) for k, v in self.module.model.state_dict().items()
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.model.load_state_dict(state)

    def reinit_trainable(self, seed: int) -> None:
        """Nothing is random in a pretrained encoder (the pooler, untrained, is dropped)."""

    def set_frozen(self, frozen: bool) -> None:
        self.module.model.requires_grad_(not frozen)


def load_encoder(ref: str, pooling: str, gradient_checkpointing: bool) -> EncoderBackbone:
    """An encoder from `pkg:<name>`, `hf:<repo>` or a local model directory.

    The pretrained pooler (BERT's dense layer over [CLS]) is dropped: the regressor pools itself,
    and a parameter that never receives a gradient stalls distributed data parallel training.
    """
    tokenizer, model = load_transformer(ref)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    if gradient_checkpointing:
        model.config.use_cache = False  # a cache is meaningless (and refused) when recomputing
        kwargs = {"use_reentrant": False}  # the re-entrant variant breaks DDP and frozen inputs
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return EncoderBackbone(ref, model, tokenizer, pooling)


def load_backbone(cfg: TextConfig, dtype: torch.dtype | None = None) -> TextBackbone:
    """The backbone `text.kind` names, with pretrained weights from `text.model`.

    `dtype`: a LoRA decoder's frozen base weights (the trainer passes its precision's
    `param_dtype`); None = what `text.mixed_precision` gets on this process's device. Encoders
    load in float32 (autocast handles mixed precision)."""
    if cfg.kind == "encoder":
        return load_encoder(cfg.model, cfg.pooling, cfg.gradient_checkpointing)
    if cfg.kind == "decoder_lora":
        from pricefuse.models.text.decoder_lora import load_decoder_lora  # peft + gguf: only here

        lora = cfg.lora
        return load_decoder_lora(
            cfg.model,
            r=lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=tuple(lora.target_modules),
            pooling=cfg.pooling,
            gradient_checkpointing=cfg.gradient_checkpointing,
            dtype=dtype if dtype is not None else _device_param_dtype(cfg.mixed_precision),
        )
    raise ValueError(f"unknown text.kind {cfg.kind!r}; known: {', '.join(KINDS)}")


def _device_param_dtype(preference: str) -> torch.dtype:
    """What the preference gets on this process's device (quietly: serving trains nothing)."""
    capability = cuda_capability()
    device = "cuda" if capability is not None else "cpu"
    return choose_precision(preference, device, capability).param_dtype
