"""Environment fixes applied once, before heavy imports (the CLI and the pyfunc loader call
`apply()`). Each fix says why it exists and when it applies; nothing here changes behaviour on a
machine that does not need it.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

_APPLIED = False

# Quiet, offline-friendly defaults. setdefault: a user's explicit environment always wins.
_ENV_DEFAULTS = {
    # MLflow and DVC must not phone home (the machines here reach only package registries).
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    # libgomp's default ACTIVE wait policy spins idle threads; on a 2-core machine under load
    # GBDT training runs 10-50x slower with it. Must be set before libgomp is loaded.
    "OMP_WAIT_POLICY": "PASSIVE",
    # HF tokenizers fork-warn and oversubscribe cores when torch already uses them.
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_env_defaults() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def patch_torchvision() -> bool:
    """Make `import torchvision` work on CPU-only torch. Returns True if the patch was needed.

    Why: PyPI's torchvision==0.28.0 (the release matching torch==2.13.0) is a CUDA build. On the
    CPU torch wheel its compiled operators are missing, and importing torchvision raises
    `RuntimeError: operator torchvision::nms does not exist` while registering fake/autograd
    kernels for those operators. timm imports torchvision, so image encoders would not load.
    When: only if the plain import fails with that error. The two registration modules are
    replaced by empty modules; torchvision's Python models and transforms then work, compiled
    ops such as `nms` stay unavailable (pricefuse does not use them).
    """
    try:
        importlib.import_module("torchvision")
        return False
    except ModuleNotFoundError:
        return False
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules[name] = types.ModuleType(name)
    importlib.import_module("torchvision")
    return True


def apply() -> None:
    """Apply every fix once per process."""
    global _APPLIED
    if _APPLIED:
        return
    apply_env_defaults()
    patch_torchvision()
    _APPLIED = True
