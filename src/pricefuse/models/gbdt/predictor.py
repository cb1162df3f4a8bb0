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

from pricefuse.features.tabular import Embeddings, FeatureMatrix, TabularFeaturizer
from pricefuse.models.gbdt.boosters import (
    SMALL_PREDICT_ROWS,
    Booster,
    MemberKind,
    booster_class,
    member_kind,
    member_prediction,
    member_view,
    unit_base,
    view_columns,
)
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
    TabularFeaturizer.save), and `<member>/fold_<k><suffix>` native model files; nothing is
    pickled. A member is one booster kind trained on log1p price (`lightgbm`), on log1p price
    per canonical unit (`lightgbm_unit`), or on log1p price from the features less the
    `member_*` / `nbr_*` columns (`lightgbm_own`, its own view; see models.gbdt.training). A
    row's prediction is the mean over folds of fold k's model on fold k's features (an own-view
    member: their `view_columns`), plus fold k's offset (and, per unit, the row's log1p
    quantity), clipped.
    """

    def __init__(
        self,
        featurizers: Sequence[TabularFeaturizer],
        models: Mapping[str, Sequence[Booster]],
        clip: tuple[float, float],
        offsets: Mapping[str, Sequence[float]] | Sequence[float],
        kinds: Mapping[str, MemberKind] | None = None,
    ) -> None:
        """`offsets`: per member, one target offset per fold (one sequence: the same for every
        member, as a manifest before per-unit members wrote them). `kinds`: per member, its
        MemberKind; by default read from the member's name (boosters.member_kind)."""
        if not models or any(len(m) != len(featurizers) for m in models.values()):
            raise ValueError("GbdtPredictor needs one model per fold featurizer for each booster")
        if not isinstance(offsets, Mapping):
            offsets = dict.fromkeys(models, offsets)
        if set(offsets) != set(models) or any(len(offsets[m]) != len(featurizers) for m in models):
            raise ValueError("GbdtPredictor needs one target offset per fold for each member")
        self.offsets = {name: [float(v) for v in offsets[name]] for name in models}
        given = kinds or {}
        self.kinds = {name: given.get(name) or member_kind(name) for name in models}
        self.featurizers = list(featurizers)
        self.models = {name: list(fold_models) for name, fold_models in models.items()}
        self.clip = (float(clip[0]), float(clip[1]))
        self._merged: dict[str, MergedFolds | None] | None = None

    @property
    def boosters(self) -> tuple[str, ...]:
        """The member names (booster kinds and their `_unit` / `_own` variants)."""
        return tuple(self.models)

    def predict(
        self,
        parsed_df: pd.DataFrame,
        text_emb: np.ndarray,
        image_emb: np.ndarray,
        image_mask: np.ndarray,
        columns: Mapping[str, np.ndarray] | None = None,
        llm: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Member name -> log1p price per row of `parsed_df` (embeddings aligned by row).
        `columns`: numeric columns of `parsed_df` already at hand as float64 arrays (a
        MemberBatch's `arrays`), taken as they are instead of read from the table. `llm`: the
        LLM text block, which featurizers fitted with it need (`llm_pc*`)."""
        emb = Embeddings(text_emb, image_emb, np.asarray(image_mask, dtype=bool), llm)
        n = len(parsed_df)
        # columns every fold's featurizer computes alike (TabularFeaturizer.transform)
        shared: dict[str, Any] = dict(columns or {})
        xs = [featurizer.transform(parsed_df, emb, shared) for featurizer in self.featurizers]
        merged = self.merged_folds() if n <= MERGED_MAX_ROWS else {}
        # per view (own view or not), each fold's columns the member reads, and them side by
        # side for the merged models (merged on that view's width): computed once per call
        views: dict[bool, list[FeatureMatrix]] = {}
        side_by_side: dict[bool, np.ndarray] = {}
        bases: dict[bool, list[np.ndarray | float]] = {}
        out = {}
        for name, fold_models in self.models.items():
            kind = self.kinds[name]
            if kind.own_view not in views:
                views[kind.own_view] = [member_view(x, kind) for x in xs]
            member_xs = views[kind.own_view]
            if merged.get(name) is not None:
                if kind.own_view not in side_by_side:
                    side_by_side[kind.own_view] = np.hstack([x.values for x in member_xs])
                raw = merged[name].predict(
                    side_by_side[kind.own_view], small=n <= SMALL_PREDICT_ROWS
                )
                folds = [raw[:, k] for k in range(len(xs))]
            else:
                folds = [model.predict(x) for model, x in zip(fold_models, member_xs, strict=True)]
            per_unit = kind.per_unit
            if per_unit not in bases:
                bases[per_unit] = [unit_base(x, per_unit) for x in xs]
            total = np.zeros(n)
            for pred, offset, base in zip(folds, self.offsets[name], bases[per_unit], strict=True):
                # each fold clipped, as training did
                total += member_prediction(pred, offset, base, self.clip)
            out[name] = total / len(self.featurizers)
        return out

    def merged_folds(self) -> dict[str, MergedFolds | None]:
        """Per member, its fold models merged into one native model of its booster kind
        (pricefuse.models.gbdt.merged; None where not merged), built on first use and kept:
        `load` builds them, so a served model pays the seconds of merging at start-up, never on
        a request. A merged model answers the raw fold outputs; `predict` adds each fold's
        offset (and a per-unit member's log1p quantity) as on the fold-by-fold path. An
        own-view member's folds are merged on its view's width (`view_columns`), and `predict`
        feeds it the folds' view columns side by side."""
        if self._merged is None:
            names = self.featurizers[0].names
            self._merged = {}
            for name, fold_models in self.models.items():
                kind = self.kinds[name]
                columns = view_columns(names, kind.own_view)
                width = len(names) if columns is None else len(columns)
                natives = [model.native for model in fold_models]
                self._merged[name] = merge_folds(kind.booster, natives, width)
        return self._merged

    def predict_members(self, batch: Any) -> dict[str, np.ndarray]:
        """The registry's serving interface (see pricefuse.pipeline.members)."""
        # the parsed fields from the table, the joined numbers as the arrays they are
        return self.predict(
            batch.base, batch.text, batch.image, batch.image_mask, batch.arrays, batch.llm
        )

    def save(self, model_dir: Path | str) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        featurizer_dirs = []
        for k, featurizer in enumerate(self.featurizers):
            featurizer.save(model_dir / f"featurizer_{k}")
            featurizer_dirs.append(f"featurizer_{k}")
        files: dict[str, list[str]] = {}
        members: dict[str, dict[str, Any]] = {}
        for name, fold_models in self.models.items():
            kind = self.kinds[name]
            (model_dir / name).mkdir(exist_ok=True)
            files[name] = []
            for k, model in enumerate(fold_models):
                relative = f"{name}/fold_{k}{booster_class(kind.booster).suffix}"
                model.save(model_dir / relative)
                files[name].append(relative)
            members[name] = {
                "booster": kind.booster,
                "per_unit": kind.per_unit,
                "own_view": kind.own_view,  # reads only boosters.view_columns of the features
                "offsets": self.offsets[name],
            }
        manifest = {
            "featurizers": featurizer_dirs,
            "clip": list(self.clip),
            "feature_names": list(self.featurizers[0].names),
            "models": files,
            "members": members,
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
        # A manifest from before per-unit members has no `members`: every member is then a
        # plain booster named by its kind, and all share the top-level `offsets`; one from
        # before own-view members has no `own_view` (none was).
        members = manifest.get("members")
        kinds = (
            {
                name: MemberKind(m["booster"], m["per_unit"], m.get("own_view", False))
                for name, m in members.items()
            }
            if members is not None
            else {name: member_kind(name) for name in manifest["models"]}
        )
        offsets = (
            {name: m["offsets"] for name, m in members.items()}
            if members is not None
            else manifest["offsets"]
        )
        models = {
            name: [booster_class(kinds[name].booster).load(model_dir / rel) for rel in relatives]
            for name, relatives in manifest["models"].items()
        }
        predictor = cls(featurizers, models, tuple(manifest["clip"]), offsets, kinds)
        predictor.merged_folds()
        return predictor
