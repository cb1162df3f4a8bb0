"""Which arithmetic the text member trains (and checks its saved model) in, from what the device
does natively.

`text.mixed_precision` is a *preference*: `auto` (bf16 where native, else fp16), `bf16`, `fp16`
or `no` (fp32). What a run gets depends on the device too:

- CPU (and any non-CUDA device): fp32, whatever the preference (CPU autocast is slow and noisy);
- CUDA with native bf16 (compute capability >= 8.0: A100, L4, A10, RTX 30xx/40xx, H100/H200):
  `auto`/`bf16` -> bf16 autocast, and a LoRA decoder's frozen base weights in bf16 (half the
  memory, the tensor cores' type);
- CUDA without it (T4 7.5, V100 7.0, P100 6.0): `torch.cuda.is_bf16_supported()` says yes there
  too (emulated, several times slower, no error), so it is not asked; `auto` -> fp16 autocast
  with a loss scaler (accelerate's fp16 mode brings a GradScaler), and `bf16` falls back to the
  same with one logged warning instead of emulating. Base weights stay fp32 under fp16: autocast
  runs the matmuls in fp16 while norms and softmax stay fp32, whereas Gemma's activations
  overflow fp16 when the weights themselves are fp16;
- a GPU whose fp16 is slow too (compute capability below 7.0, except the P100's 6.0): `auto` and
  `bf16` train in fp32 (an explicit `fp16` is honoured);
- `no`: fp32 everywhere.

`choose_precision` is the pure decision (tested on every branch); `device_precision` asks the
device and logs a fallback once per process; `Precision.of` rebuilds the choice from an
Accelerator's `mixed_precision`, which is what the trainer and the reload check follow.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PREFERENCES = ("auto", "bf16", "fp16", "no")
MIXED = ("no", "bf16", "fp16")
NATIVE_BF16 = (8, 0)  # Ampere and later
FAST_FP16 = (7, 0)  # Volta and later (tensor cores); the P100 (6.0) also runs fp16 at 2x fp32
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """What one device trains in.

    - mixed: accelerate's `mixed_precision` (autocast dtype; "no" = fp32);
    - scaler: whether the loss is scaled (fp16's narrow range; accelerate adds the GradScaler);
    - param_dtype: a LoRA decoder's frozen base weights (bf16 only under native bf16);
    - note: why the preference was not followed, when it was not and that matters (else None).
    """

    mixed: str
    scaler: bool
    param_dtype: torch.dtype
    note: str | None = None

    @classmethod
    def of(cls, mixed: str) -> Precision:
        """The precision an Accelerator built with `mixed_precision=mixed` trains in."""
        if mixed not in MIXED:
            raise ValueError(f"mixed precision must be one of {', '.join(MIXED)}, got {mixed!r}")
        return cls(mixed, mixed == "fp16", torch.bfloat16 if mixed == "bf16" else torch.float32)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.mixed == "no" else DTYPES[self.mixed]

    @property
    def label(self) -> str:
        """What a run records: fp32, bf16 or fp16 (+scaler)."""
        return "fp32" if self.mixed == "no" else self.mixed + ("+scaler" if self.scaler else "")


def check_preference(requested: str) -> None:
    if requested not in PREFERENCES:
        raise ValueError(
            f"text.mixed_precision must be one of {', '.join(PREFERENCES)}, got {requested!r}"
        )


def choose_precision(
    requested: str, device_type: str, capability: tuple[int, int] | None
) -> Precision:
    """The precision for preference `requested` on a `device_type` ("cuda", "cpu", ...) of CUDA
    compute `capability` (major, minor; None when not a CUDA device). Pure: see the module doc."""
    check_preference(requested)
    if requested == "no" or device_type != "cuda":
        return Precision.of("no")
    capability = tuple(capability) if capability is not None else (0, 0)
    native_bf16 = capability >= NATIVE_BF16
    fast_fp16 = capability >= FAST_FP16 or capability == (6, 0)
    where = f"compute capability {capability[0]}.{capability[1]}"
    if requested == "fp16":
        return Precision.of("fp16")
    if native_bf16:
        return Precision.of("bf16")
    if fast_fp16:
        chosen = Precision.of("fp16")
        note = (
            f"text.mixed_precision bf16 requested, but this GPU ({where}) has no native bf16 "
            "(it would be emulated, several times slower): training in fp16 with loss scaling"
        )
    else:
        chosen = Precision.of("no")
        note = (
            f"text.mixed_precision {requested} requested, but this GPU ({where}) has neither "
            "native bf16 nor fast fp16: training in fp32"
        )
    # `auto` means "whatever is native": its fp16 on a T4 is no surprise worth a warning.
    if requested == "auto" and chosen.mixed == "fp16":
        return chosen
    return Precision(chosen.mixed, chosen.scaler, chosen.param_dtype, note)


def cuda_capability() -> tuple[int, int] | None:
    """This process's CUDA device's compute capability (torchrun: LOCAL_RANK's), or None."""
    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0") or 0) % max(1, torch.cuda.device_count())
    return tuple(torch.cuda.get_device_capability(index))


_warned: set[str] = set()


def device_precision(requested: str, device_type: str) -> Precision:
    """`choose_precision` for this process's device; a fallback is logged once per process (and
    only by the first process of a torchrun launch)."""
    capability = cuda_capability() if device_type == "cuda" else None
    chosen = choose_precision(requested, device_type, capability)
    if chosen.note and chosen.note not in _warned:
        _warned.add(chosen.note)
        if os.environ.get("RANK", "0") in ("", "0"):
            log.warning(chosen.note)
    return chosen


def reload_tolerance(mixed: str) -> float:
    """Absolute tolerance (log1p price) for a saved model re-predicting what the run computed
    through the same path: 4 units in the last place of the autocast dtype (bf16 3.1e-2, fp16
    3.9e-3), and 1e-4 in fp32 (the same kernels on the same shapes agree far more closely; the
    floor absorbs reduction-order noise)."""
    dtype = Precision.of(mixed).autocast_dtype
    return 1e-4 if dtype is None else 4 * torch.finfo(dtype).eps
