"""The saved fusion model: the fold models of one training run, averaged.

A fitted `InputSpec` and its trained head (pricefuse.models.fusion.heads) form a `FoldModel`;
`FusionPredictor` is the fold models of one K-fold run, saved as `predictor.json` (specs and
architectures, the head's `arch` name among them, readable) + `fold_k.pt` (weights).
The ensemble and the served model load it by the registry's string
`pricefuse.models.fusion.predictor:FusionPredictor` (pricefuse.pipeline.members).

Format 2 added the head's name and knobs; a format-1 manifest (written before there was a
choice) loads as the gated residual head it is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from pricefuse.models.fusion.heads import FusionHeadBase, HeadArch, build_head
from pricefuse.models.fusion.heads.dcn import DcnHead, StackedDcn
from pricefuse.models.fusion.inputs import (
    UNIT_COLUMN,
    FusionInputs,
    InputSpec,
    SplitData,
    numeric_matrix,
)

if TYPE_CHECKING:
    from pricefuse.pipeline.members import MemberBatch

# Rows per forward pass at prediction time: bounds memory for large test sets.
PREDICT_BATCH = 8192
# Inputs of at most this many rows run the fold heads stacked (one batched forward for all
# folds, `StackedDcn`) where the head allows it: what a served request of a few rows pays for.
# Larger inputs run head by head: their per-operation costs are spread over many rows, and
# stacking would hold every fold's copy of the inputs at once.
STACKED_MAX_ROWS = 64
MANIFEST = "predictor.json"
FORMAT_VERSION = 2
# Manifests this version reads: 1 = gated residual only (no `arch` name in the fold arch).
READABLE_FORMATS = (1, 2)


@dataclass
class FoldModel:
    """One fold's fitted spec and trained head."""

    spec: InputSpec
    head: FusionHeadBase

    @torch.inference_mode()
    def predict_inputs(self, inputs: FusionInputs) -> np.ndarray:
        """Clipped log1p predictions for already built inputs (eval mode: no dropout), computed
        where the head is (batches moved there; on the CPU nothing moves)."""
        # Toggled only when needed: eval()/train() walk every submodule, which cost more than a
        # served row's forward pass.
        was_training = self.head.training
        toggle = any(module.training for module in self.head.modules())
        if toggle:
            self.head.eval()
        device = self.head.target_mean.device
        out = [
            self.head(*(t.to(device) for t in inputs.features(slice(start, start + PREDICT_BATCH))))
            .cpu()
            .numpy()
            for start in range(0, len(inputs), PREDICT_BATCH)
        ]
        if toggle:
            self.head.train(was_training)
        pred = np.concatenate(out).astype(np.float64) if out else np.zeros(0)
        return self.spec.clip(pred)

    def predict(self, data: SplitData) -> np.ndarray:
        return self.predict_inputs(self.spec.build(data))


class FusionPredictor:
    """The fold models of one training run; predicts the mean of their log1p predictions.

    This is what the serving model and the ensemble load: `FusionPredictor.load(model_dir)`.
    """

    def __init__(self, folds: Sequence[FoldModel]) -> None:
        if not folds:
            raise ValueError("a FusionPredictor needs at least one fold model")
        self.folds = list(folds)
        self._stacked: StackedDcn | None = None

    def stacked(self) -> StackedDcn | None:
        """The fold heads as one `StackedDcn`, when they are `dcn` heads in eval mode (other
        heads, or a head put in training mode, run one by one). Built on first use and kept
        while the heads are unchanged in eval mode; it copies their weights."""
        heads = [fold.head for fold in self.folds]
        if len(heads) < 2 or not all(type(h) is DcnHead and not h.training for h in heads):
            return None
        if self._stacked is None or self._stacked_of != [id(h) for h in heads]:
            self._stacked = StackedDcn(heads)
            self._stacked_of = [id(h) for h in heads]
        return self._stacked

    def predict(
        self,
        parsed: pd.DataFrame,
        text_emb: np.ndarray,
        image_emb: np.ndarray,
        image_mask: np.ndarray,
        columns: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """log1p price per row (fold-averaged, each fold's prediction clipped to its range).
        `columns`: numeric columns of `parsed` already at hand as float64 arrays (a
        MemberBatch's `arrays`; see `numeric_matrix`)."""
        data = SplitData(parsed, text_emb, image_emb, image_mask)
        # The raw numeric features have no fitted state: built once per column set, not per fold.
        raw: dict[tuple[str, ...], np.ndarray] = {}
        units = data.frame[UNIT_COLUMN].tolist()
        inputs = []
        for fold in self.folds:
            extra = fold.spec.extra_numeric
            if extra not in raw:
                raw[extra] = numeric_matrix(data, extra, columns)
            inputs.append(fold.spec.build(data, raw[extra], units))
        stacked = self.stacked() if 0 < len(data) <= STACKED_MAX_ROWS else None
        if stacked is not None:
            per_fold = [i.features() for i in inputs]
            features = [torch.stack(parts) for parts in zip(*per_fold, strict=True)]
            out = stacked(*features).numpy().astype(np.float64)
            predictions = [fold.spec.clip(out[k]) for k, fold in enumerate(self.folds)]
        else:
            predictions = [
                fold.predict_inputs(i) for fold, i in zip(self.folds, inputs, strict=True)
            ]
        return np.mean(predictions, axis=0)

    def predict_members(self, batch: MemberBatch) -> dict[str, np.ndarray]:
        """The registry's serving interface (see pricefuse.pipeline.members)."""
        # the parsed fields from the table, the joined numbers as the arrays they are
        return {
            "fusion": self.predict(
                batch.base, batch.text, batch.image, batch.image_mask, columns=batch.arrays
            )
        }

    def save(self, model_dir: Path | str) -> Path:
        """Write `predictor.json` (specs and architecture, readable) and `fold_k.pt` (weights).

        Fold files of an earlier save (e.g. with more folds) are removed first: the directory is
        logged as the model, and a stale `fold_7.pt` would ship weights no manifest names.
        """
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        for stale in model_dir.glob("fold_*.pt"):
            stale.unlink()
        entries = []
        for k, fold in enumerate(self.folds):
            name = f"fold_{k}.pt"
            torch.save(fold.head.state_dict(), model_dir / name)
            entries.append(
                {"weights": name, "arch": fold.head.arch.to_dict(), "spec": fold.spec.to_dict()}
            )
        manifest = {"format": FORMAT_VERSION, "folds": entries}
        path = model_dir / MANIFEST
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: Path | str) -> FusionPredictor:
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a fusion model directory")
        manifest = json.loads(path.read_text())
        if manifest.get("format") not in READABLE_FORMATS:
            raise ValueError(
                f"{path}: format {manifest.get('format')}, expected one of {READABLE_FORMATS}"
            )
        folds = []
        for entry in manifest["folds"]:
            head = build_head(HeadArch.from_dict(entry["arch"]))
            state = torch.load(model_dir / entry["weights"], map_location="cpu", weights_only=True)
            head.load_state_dict(state)
            head.eval()
            folds.append(FoldModel(InputSpec.from_dict(entry["spec"]), head))
        return cls(folds)
