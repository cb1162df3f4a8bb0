"""The saved text member: what the ensemble and the served model load.

The model directory holds `text.json` (the `text` parameters the run trained with, which models
serve, and how they combine) and the serving checkpoints it names: `refit.pt` (one model refit
on every row, `text.refit: true`) or `fold_<k>.pt` (the K fold models, averaged in log space).
A checkpoint holds the backbone's trainable state (an encoder's weights; a LoRA backbone's
adapters), the head and the target scale; base weights are loaded from `text.model` by reference
(pkg:/hf:/path), so they must resolve wherever the model is served, as the embed encoders must.

The registry (`pricefuse.pipeline.members`) names `pricefuse.models.text.predictor:TextPredictor`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from pricefuse.core.config import TextConfig, section_from_dict
from pricefuse.models.text.backbones import TextBackbone, load_backbone
from pricefuse.models.text.data import PadCollate, TokenRows, by_length, pad_id, render_texts
from pricefuse.models.text.data import tokenize as tokenize_texts
from pricefuse.models.text.precision import Precision
from pricefuse.models.text.regressor import (
    RowOutputs,
    TargetScale,
    TextRegressor,
    build_regressor,
    predict_batches,
)

if TYPE_CHECKING:
    from pricefuse.pipeline.members import MemberBatch

MEMBER = "text"
MANIFEST = "text.json"
FORMAT_VERSION = 1
# `text` parameters added after manifests were first written, with the value that reproduces
# what a model saved before them did: such a model still loads.
MANIFEST_DEFAULTS = {"log_every": 50, "device": "auto"}


def write_manifest(directory: Path, cfg: TextConfig, files: Sequence[Path]) -> Path:
    """`text.json`: the parameters to rebuild the backbone and the serving checkpoints."""
    directory = Path(directory)
    manifest = {
        "format": FORMAT_VERSION,
        "member": MEMBER,
        "combine": "refit" if cfg.refit else "fold_mean",
        "models": [Path(f).name for f in files],
        "text": dataclasses.asdict(cfg),
    }
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


class ServingModel:
    """One serving checkpoint: the backbone's trainable state, the head, the target scale."""

    def __init__(self, trainable: dict, head: dict, scale: TargetScale) -> None:
        self.trainable = trainable
        self.head = head
        self.scale = scale


class TextPredictor:
    """Backbone + the serving checkpoints; predicts log1p price from parsed rows.

    With one model (the refit) its weights are loaded once. With K fold models they share one
    backbone and each prediction loads each fold's state in turn: K forward passes per row (see
    benchmarks/text_member.py for what that costs), but one backbone in memory.

    `mixed`: the autocast it predicts under ("no": none, as served; "bf16"/"fp16": what a
    training run used, for the reload check, which must take the training run's path);
    `device`: where it runs (default: CUDA when there is one).
    """

    def __init__(
        self,
        cfg: TextConfig,
        backbone: TextBackbone,
        models: list[ServingModel],
        *,
        mixed: str = "no",
        device: torch.device | str | None = None,
    ) -> None:
        if not models:
            raise ValueError("a TextPredictor needs at least one serving model")
        self.cfg = cfg
        self.backbone = backbone
        self.models = models
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device is not None:
            self.device = torch.device(device)
        self.autocast_dtype = Precision.of(mixed).autocast_dtype
        self.regressor = build_regressor(backbone, cfg.head_dropout).to(self.device).eval()
        self._loaded: int | None = None

    @classmethod
    def load(
        cls,
        directory: Path | str,
        *,
        backbone: TextBackbone | None = None,
        mixed: str = "no",
        device: torch.device | str | None = None,
    ) -> TextPredictor:
        """The predictor saved in `directory`; `backbone`: one already loaded for the same
        `text.model` to reuse (its trainable state is overwritten by the checkpoints'),
        instead of loading the base model again."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: not a text model directory (train_text ran disabled? add "
                "`text` to ensemble.members)"
            )
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: format {manifest.get('format')}, expected {FORMAT_VERSION}")
        raw = {**MANIFEST_DEFAULTS, **manifest["text"]}  # a manifest may predate these
        cfg = section_from_dict(TextConfig, raw, "text", source=str(path))
        models = []
        for name in manifest["models"]:
            payload = torch.load(directory / name, map_location="cpu", weights_only=True)
            scale = TargetScale.from_dict(payload["scale"])
            models.append(ServingModel(payload["trainable"], payload["head"], scale))
        if backbone is None:
            backbone = load_backbone(cfg)
        return cls(cfg, backbone, models, mixed=mixed, device=device)

    def _use(self, index: int) -> TextRegressor:
        if self._loaded != index:
            model = self.models[index]
            self.backbone.load_trainable_state_dict(model.trainable)
            self.regressor.head.load_state_dict(model.head)
            self.regressor.to(self.device).eval()
            self._loaded = index
        return self.regressor

    def tokenize(self, parsed: pd.DataFrame) -> list[list[int]]:
        texts = render_texts(parsed, self.cfg.template)
        return tokenize_texts(self.backbone.tokenizer, texts, self.cfg.max_length)

    def outputs(self, parsed: pd.DataFrame, pooled: bool = False) -> tuple[np.ndarray, Any]:
        """(log1p prediction, pooled vector or None) per row: the mean over serving models."""
        ids = self.tokenize(parsed)
        if not ids:
            return np.zeros(0), (np.zeros((0, self.backbone.dim), np.float32) if pooled else None)
        ordered = by_length(ids, np.arange(len(ids)))
        preds, vectors = [], []
        for index, model in enumerate(self.models):
            loader = DataLoader(
                TokenRows(ids, ordered),
                batch_size=self.cfg.predict_batch_size,
                collate_fn=PadCollate(pad_id(self.backbone.tokenizer)),
            )
            with self._autocast():
                out: RowOutputs = predict_batches(
                    self._use(index), loader, np.arange(len(ids)), self.device, pooled
                )
            preds.append(out.log_price(model.scale))
            if out.pooled is not None:
                vectors.append(out.pooled)
        return np.mean(preds, axis=0), (np.mean(vectors, axis=0) if vectors else None)

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def predict(self, parsed: pd.DataFrame) -> np.ndarray:
        return self.outputs(parsed)[0]

    def predict_members(self, batch: MemberBatch) -> dict[str, np.ndarray]:
        """The registry's serving interface (see pricefuse.pipeline.members)."""
        return {MEMBER: self.predict(batch.base)}  # text fields only: never the joined columns
