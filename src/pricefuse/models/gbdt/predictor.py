"""The persisted GBDT member: each fold's featurizer and booster models, as serving loads them.

Why its own module: serving imports it by name (`pricefuse.pipeline.members`) and needs none of the
training code; and its on-disk layout is a contract (docs/architecture.md, module map) that
should change only on purpose.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pricefuse.features.tabular import Embeddings, TabularFeaturizer
from pricefuse.models.gbdt.boosters import SMALL_PREDICT_ROWS, Booster, booster_class
from pricefuse.models.gbdt.merged import MergedFolds, merge_folds

MANIFEST = "gbdt.json"
# Inputs of at most this many rows go through the merged fold models: one library call per
# booster instead of one per fold, which is what a request of a few rows pays for (one row:
# LightGBM 0.17 against 0.39 ms, XGBoost 1.7 against 2.3 ms, idle 2-core machine). Larger inputs
# call the fold models one by one: their fixed costs are spread over many rows there, and from
# about 64 rows LightGBM's merged multiclass model is the slower. Both give the same
# predictions (tests/unit/test_gbdt.py).
MERGED_MAX_ROWS = 16


class GbdtPredictor:
    """Each fold's fitted featurizer and booster models: what serving loads and calls.

    On disk (`model_dir`): `gbdt.json` (manifest), `featurizer_<k>/` (JSON + .npy, see
    TabularFeaturizer.save), and `<booster>/fold_<k><suffix>` native model files; nothing is
    pickled. A row's prediction is the mean over folds of fold k's boosters on fold k's features.
    """

    def __init__(
        self,
        featurizers: Sequence[TabularFeaturizer],
        models: Mapping[str, Sequence[Booster]],
        clip: tuple[float, float],
        offsets: Sequence[float],
    ) -> None:
        if not models or any(len(m) != len(featurizers) for m in models.values()):
            raise ValueError("GbdtPredictor needs one model per fold featurizer for each booster")
        if len(offsets) != len(featurizers):
            raise ValueError("GbdtPredictor needs one target offset per fold")
        self.offsets = [float(v) for v in offsets]
        self.featurizers = list(featurizers)
        self.models = {name: list(fold_models) for name, fold_models in models.items()}
        self.clip = (float(clip[0]), float(clip[1]))
        self._merged: dict[str, MergedFolds | None] | None = None

    @property
    def boosters(self) -> tuple[str, ...]:
        return tuple(self.models)

    def predict(
        self,
        parsed_df: pd.DataFrame,
        text_emb: np.ndarray,
        image_emb: np.ndarray,
        image_mask: np.ndarray,
        columns: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Booster name -> log1p price per row of `parsed_df` (embeddings aligned by row).
        `columns`: numeric columns of `parsed_df` already at hand as float64 arrays (a
        MemberBatch's `arrays`), taken as they are instead of read from the table."""
        emb = Embeddings(text_emb, image_emb, np.asarray(image_mask, dtype=bool))
        lo, hi = self.clip
        n = len(parsed_df)
        # columns every fold's featurizer computes alike (TabularFeaturizer.transform)
        shared: dict[str, Any] = dict(columns or {})
        xs = [featurizer.transform(parsed_df, emb, shared) for featurizer in self.featurizers]
        merged = self.merged_folds() if n <= MERGED_MAX_ROWS else {}
        side_by_side = None
        out = {}
        for name, fold_models in self.models.items():
            if merged.get(name) is not None:
                if side_by_side is None:
                    side_by_side = np.hstack([x.values for x in xs])
                raw = merged[name].predict(side_by_side, small=n <= SMALL_PREDICT_ROWS)
                folds = [raw[:, k] for k in range(len(xs))]
            else:
                folds = [model.predict(x) for model, x in zip(fold_models, xs, strict=True)]
            total = np.zeros(n)
            for pred, offset in zip(folds, self.offsets, strict=True):
                total += np.clip(pred + offset, lo, hi)  # each fold clipped, as training did
            out[name] = total / len(self.featurizers)
        return out

    def merged_folds(self) -> dict[str, MergedFolds | None]:
        """Per booster, its fold models merged into one native model (pricefuse.models.gbdt.
        merged; None where not merged), built on first use and kept: `load` builds them, so a
        served model pays the seconds of merging at start-up, never on a request."""
        if self._merged is None:
            width = len(self.featurizers[0].names)
            self._merged = {
                name: merge_folds(name, [model.native for model in fold_models], width)
                for name, fold_models in self.models.items()
            }
        return self._merged

    def predict_members(self, batch: Any) -> dict[str, np.ndarray]:
        """The registry's serving interface (see pricefuse.pipeline.members)."""
        # the parsed fields from the table, the joined numbers as the arrays they are
        return self.predict(batch.base, batch.text, batch.image, batch.image_mask, batch.arrays)

    def save(self, model_dir: Path | str) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        featurizer_dirs = []
        for k, featurizer in enumerate(self.featurizers):
            featurizer.save(model_dir / f"featurizer_{k}")
            featurizer_dirs.append(f"featurizer_{k}")
        files: dict[str, list[str]] = {}
        for name, fold_models in self.models.items():
            (model_dir / name).mkdir(exist_ok=True)
            files[name] = []
            for k, model in enumerate(fold_models):
                relative = f"{name}/fold_{k}{booster_class(name).suffix}"
                model.save(model_dir / relative)
                files[name].append(relative)
        manifest = {
            "featurizers": featurizer_dirs,
            "clip": list(self.clip),
            "offsets": self.offsets,
            "feature_names": list(self.featurizers[0].names),
            "models": files,
        }
        (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return model_dir

    @classmethod
    def load(cls, model_dir: Path | str) -> GbdtPredictor:
        model_dir = Path(model_dir)
        manifest_path = model_dir / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} not found: not a saved GbdtPredictor")
        manifest = json.loads(manifest_path.read_text())
        pickled = [f for f in manifest["featurizers"] if f.endswith(".joblib")]
        if pickled:
            raise ValueError(
                f"{model_dir} holds pickled featurizers ({pickled[0]}) from an older pricefuse, "
                "which no longer loads pickle: re-run train_gbdt"
            )
        featurizers = [TabularFeaturizer.load(model_dir / f) for f in manifest["featurizers"]]
        models = {
            name: [booster_class(name).load(model_dir / rel) for rel in relatives]
            for name, relatives in manifest["models"].items()
        }
        predictor = cls(featurizers, models, tuple(manifest["clip"]), manifest["offsets"])
        predictor.merged_folds()
        return predictor
