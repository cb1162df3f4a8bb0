"""Per-fold checkpoints of the text member: what lets a killed `train_text` resume.

Each finished fold writes `fold_<k>.pt` into the model directory (the refit model `refit.pt`):
the backbone's trainable state, the head, the target scale, the fold's learning curves and its
out-of-fold outputs (log1p predictions, pooled vectors as float16). Written atomically (a temp file
in the same directory, then one rename), so a kill leaves either the old file or the new one.

Every file carries a fingerprint of what determines the fold's result: the training parameters
(`text.*` except those only serving reads, `refit`, `export_embeddings`, `predict_batch_size`,
and `log_every`, which only changes how often the loss is read; `lora.*` only for LoRA
backbones), the rows (sample ids, fold ids, targets) and this format's
version. A run takes over a file only when the fingerprint matches, so changing a parameter or the
data retrains instead of silently reusing a stale fold. The process count is not part of it: a
fold trained on 2 GPUs is reused on 1.

After a run with `text.refit: true` the fold files no longer need their weights (the refit model
serves); `slim` drops them, keeping the OOF outputs, so a finished run is not redone and the model
directory (a DVC output, and an artifact of the served model) holds one model, not K+1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pricefuse.core.config import TextConfig

FORMAT_VERSION = 1
REFIT = "refit"
WEIGHT_KEYS = ("trainable", "head")
# Parameters that do not change what a fold learns (serving-side choices).
NOT_FINGERPRINTED = ("refit", "export_embeddings", "predict_batch_size", "log_every")


def fingerprint(cfg: TextConfig, ids: pd.Series, folds: np.ndarray, y_log: np.ndarray) -> str:
    """sha256 over the training parameters and the rows (ids, folds, targets)."""
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    if cfg.kind != "decoder_lora":
        params.pop("lora")  # read by LoRA backbones only
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT_VERSION, "text": params}, sort_keys=True).encode())
    digest.update(json.dumps([str(i) for i in ids.tolist()]).encode())
    digest.update(np.asarray(folds, dtype=np.int64).tobytes())
    digest.update(np.round(np.asarray(y_log, dtype=np.float64), 9).tobytes())
    return digest.hexdigest()


def model_name(fold: int) -> str:
    return f"fold_{int(fold)}"


def checkpoint_path(model_dir: Path, name: str) -> Path:
    """`<name>.pt`: `fold_<k>.pt`, or `refit.pt` for the model trained on every row."""
    if name != REFIT and not (name.startswith("fold_") and name[5:].isdigit()):
        raise ValueError(f"checkpoint names are fold_<k> or {REFIT}, got {name!r}")
    return Path(model_dir) / f"{name}.pt"


def save_atomic(path: Path, payload: dict[str, Any]) -> Path:
    """torch.save to a temp file beside `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: Path, expected: str | None = None, weights: bool = True) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when absent, unreadable, of another fingerprint (when
    `expected` is given) or without weights while `weights` are needed."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: retrain rather than crash
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        return None
    if expected is not None and payload.get("fingerprint") != expected:
        return None
    if weights and not all(k in payload for k in WEIGHT_KEYS):
        return None
    return payload


def slim(path: Path) -> None:
    """Rewrite a checkpoint without its weights (keeps fingerprint, curves, OOF outputs)."""
    payload = load(path, weights=False)
    if payload is None or not any(k in payload for k in WEIGHT_KEYS):
        return
    save_atomic(path, {k: v for k, v in payload.items() if k not in WEIGHT_KEYS})


def remove_stale(model_dir: Path, keep: set[Path]) -> None:
    """Delete checkpoint files (and temp files of killed writes) not in `keep`."""
    for path in [*Path(model_dir).glob("*.pt"), *Path(model_dir).glob(".*.pt.tmp-*")]:
        if path not in keep:
            path.unlink(missing_ok=True)
