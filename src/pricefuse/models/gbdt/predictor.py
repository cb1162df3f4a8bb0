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
from pricefuse.models.gbdt.boosters import Booster, booster_class

MANIFEST = "gbdt.json"


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

    @property
    def boosters(self) -> tuple[str, ...]:
        return tuple(self.models)

    def predict(
        self,
        parsed_df: pd.DataFrame,
        text_emb: np.ndarray,
        image_emb: np.ndarray,
        image_mask: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Booster name -> log1p price per row of `parsed_df` (embeddings aligned by row)."""
        emb = Embeddings(text_emb, image_emb, np.asarray(image_mask, dtype=bool))
        lo, hi = self.clip
        sums = {name: np.zeros(len(parsed_df)) for name in self.models}
        shared: dict[str, np.ndarray] = {}  # columns every fold's featurizer computes alike
        for k, featurizer in enumerate(self.featurizers):
            x = featurizer.transform(parsed_df, emb, shared)
            for name, fold_models in self.models.items():
                sums[name] += np.clip(fold_models[k].predict(x) + self.offsets[k], lo, hi)
        return {name: total / len(self.featurizers) for name, total in sums.items()}

    def predict_members(self, batch: Any) -> dict[str, np.ndarray]:
        """The registry's serving interface (see pricefuse.pipeline.members)."""
        return self.predict(batch.parsed, batch.text, batch.image, batch.image_mask)

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
        return cls(featurizers, models, tuple(manifest["clip"]), manifest["offsets"])
