"""Where a stage computes: the `device` parameters (`embed.device`, `fusion.device`,
`gbdt.device`, `text.device`), each `auto | cpu | cuda`, resolved to "cpu" or "cuda".

`auto` takes the GPU when torch can use one, else the CPU; `cuda` insists (a StageError without
a usable GPU, rather than hours of silent CPU training). What was used is tagged on every stage
run (`device_tags`), and a machine whose GPU torch cannot see (a CPU build of torch, a driver
too old for torch's CUDA) gets one line saying so (`invisible_gpu_warning`) instead of a run
that is slow for no visible reason. docs/gpu.md says which stage uses the GPU how.

torch is imported only inside the functions, and not at all where no NVIDIA driver is present
(`_no_driver`): the stages that need no torch (train_gbdt with `auto` on a CPU machine) should
not pay its import time to learn that there is no GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

from pricefuse.core.errors import StageError

DEVICES = ("auto", "cpu", "cuda")
NVIDIA_SMI_TIMEOUT_S = 5.0
GPU_SETUP = "`make setup GPU=1` installs the CUDA environment"


def _no_driver() -> bool:
    """True when this Linux machine certainly has no NVIDIA driver (no /dev/nvidiactl, no WSL
    GPU, no nvidia-smi), so CUDA cannot work and importing torch to ask would be wasted."""
    if not sys.platform.startswith("linux"):
        return False
    return not (
        os.path.exists("/dev/nvidiactl")
        or os.path.exists("/dev/dxg")
        or shutil.which("nvidia-smi") is not None
    )


def _cuda_available() -> bool:
    if "torch" not in sys.modules and _no_driver():
        return False
    import torch

    return bool(torch.cuda.is_available())


def torch_build() -> str:
    """`torch 2.13.0+cpu is a CPU build` / `torch 2.13.0 is built for CUDA 13.0`."""
    import torch

    cuda = torch.version.cuda
    build = f"is built for CUDA {cuda}" if cuda else "is a CPU build"
    return f"torch {torch.__version__} {build}"


def resolve_device(requested: str, key: str = "device") -> str:
    """The device ("cpu" or "cuda") of a `device` setting: `auto` is "cuda" when torch can use a
    GPU, else "cpu"; `cuda` without a usable GPU and any value outside DEVICES are a StageError
    naming `key` (the dotted parameter, e.g. `embed.device`)."""
    value = str(requested).strip().lower()
    if value not in DEVICES:
        raise StageError(f"{key} must be one of {', '.join(DEVICES)}, got {requested!r}")
    if value == "cpu":
        return "cpu"
    available = _cuda_available()
    if value == "auto":
        return "cuda" if available else "cpu"
    if not available:
        seen = visible_gpus()
        where = f"nvidia-smi sees {_gpu_list(seen)}" if seen else "no NVIDIA GPU is visible"
        raise StageError(
            f"{key} is cuda but torch cannot use a GPU ({where}; {torch_build()}): "
            f"set {key}: auto or cpu, or run on a GPU machine; {GPU_SETUP} (docs/gpu.md)"
        )
    return "cuda"


def device_tags(device: str, gpu_count: int | None = None) -> dict[str, str]:
    """The run tags of a stage on `device` (resolved): `device`, `gpu_name` (the first GPU's name,
    "none" on the CPU) and `gpu_count` (GPUs the stage may use: those visible to torch unless
    given, e.g. a data-parallel run's process count; "0" on the CPU)."""
    if device != "cuda":
        return {"device": "cpu", "gpu_name": "none", "gpu_count": "0"}
    import torch

    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    return {
        "device": "cuda",
        "gpu_name": torch.cuda.get_device_name(torch.cuda.current_device()),
        "gpu_count": str(count),
    }


def visible_gpus() -> list[str]:
    """The GPU names `nvidia-smi -L` lists, [] without nvidia-smi or when it fails (never
    raises; gives up after NVIDIA_SMI_TIMEOUT_S)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []
    names = []
    for line in listing.stdout.splitlines():
        # "GPU 0: NVIDIA H200 (UUID: GPU-...)"; MIG slices are indented "MIG ..." lines.
        head, sep, rest = line.partition(":")
        if sep and head.strip().startswith("GPU"):
            names.append(rest.split("(UUID")[0].strip() or "unnamed GPU")
    return names


def _gpu_list(names: list[str]) -> str:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    kinds = ", ".join(name if n == 1 else f"{n}x {name}" for name, n in counts.items())
    return f"{len(names)} GPU{'s' if len(names) != 1 else ''} ({kinds})"


def invisible_gpu_warning() -> str | None:
    """One line when nvidia-smi lists a GPU that torch cannot use (a CPU build of torch, or a
    CUDA build the driver is too old for), else None."""
    names = visible_gpus()
    if not names or _cuda_available():
        return None
    import torch

    fix = GPU_SETUP if torch.version.cuda is None else "docs/gpu.md says which driver it needs"
    them = "it" if len(names) == 1 else "them"
    return (
        f"warning: nvidia-smi sees {_gpu_list(names)} but torch cannot use {them} "
        f"({torch_build()}): running on the CPU. {fix}."
    )


def autocast_dtype(device: str) -> Any:
    """The half-precision dtype for inference on `device`: bf16 where the GPU computes it
    natively (compute capability >= 8.0), else fp16; None on the CPU (fp32, unchanged)."""
    if device != "cuda":
        return None
    import torch

    major, _minor = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16
