"""The n-gram member: TF-IDF word and character n-grams -> Ridge on log1p(price).

Why: on small data a linear model over sparse n-grams is strong and cheap, and its errors differ
from the embedding models' (it sees exact tokens: brand names, sizes, "Pack of 12"). Character
n-grams (char_wb) catch spelling variants and sizes glued to units ("12oz").

Fold discipline: inside each fold the vectorizers and the Ridge are fitted on the other folds only,
so an OOF prediction never saw its fold. Test and serving use one full fit on every train row.
Saved without pickle: vocabularies as JSON, IDF vectors and coefficients as .npy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pricefuse.core import records
from pricefuse.core.config import LinearConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, Layout
from pricefuse.core.metrics import smape_from_log
from pricefuse.core.records import StageRecord
from pricefuse.features.ngrams import (
    VIEWS,
    fit_vectorizer,
    load_vectorizer,
    make_vectorizer,
    save_vectorizer,
    text_view,
)
from pricefuse.pipeline.inputs import train_targets
from pricefuse.pipeline.predictions import write_member_predictions

if TYPE_CHECKING:
    from pricefuse.pipeline.members import MemberBatch

MEMBER = "linear"
MANIFEST = "linear.json"
LOG_PRICE_BOUNDS = (float(np.log1p(0.01)), float(np.log1p(100_000.0)))


class LinearPredictor:
    """Fitted vectorizers + Ridge coefficients; predicts log1p price from parsed rows."""

    def __init__(
        self,
        view: str,
        vectorizers: dict[str, object],
        coef: np.ndarray,
        intercept: float,
        clip: tuple[float, float],
    ) -> None:
        self.view = view
        self.vectorizers = vectorizers
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.clip = (float(clip[0]), float(clip[1]))

    @staticmethod
    def _vectorizers(cfg: LinearConfig) -> dict[str, object]:
        return {
            "word": make_vectorizer("word", (1, cfg.word_max_ngram), cfg.min_df),
            "char": make_vectorizer(
                "char_wb", cfg.char_ngram, cfg.min_df + 1, cfg.char_max_features
            ),
        }

    def transform(self, parsed: pd.DataFrame) -> Any:
        """The rows' TF-IDF features (a scipy sparse matrix, word then char n-grams)."""
        from scipy import sparse

        texts = text_view(parsed, self.view)
        return sparse.hstack([v.transform(texts) for v in self.vectorizers.values()]).tocsr()

    @classmethod
    def fit(cls, cfg: LinearConfig, parsed: pd.DataFrame, y: np.ndarray) -> LinearPredictor:
        from sklearn.linear_model import Ridge

        y = np.asarray(y, dtype=np.float64)
        texts = text_view(parsed, cfg.view)
        vectorizers = cls._vectorizers(cfg)
        for vectorizer in vectorizers.values():
            fit_vectorizer(vectorizer, texts)
        model = cls(cfg.view, vectorizers, np.zeros(0), 0.0, (float(y.min()), float(y.max())))
        ridge = Ridge(alpha=cfg.alpha).fit(model.transform(parsed), y)
        model.coef, model.intercept = np.asarray(ridge.coef_, np.float64), float(ridge.intercept_)
        return model

    def predict(self, parsed: pd.DataFrame) -> np.ndarray:
        raw = self.transform(parsed) @ self.coef + self.intercept
        lo, hi = max(self.clip[0], LOG_PRICE_BOUNDS[0]), min(self.clip[1], LOG_PRICE_BOUNDS[1])
        return np.clip(np.asarray(raw, dtype=np.float64), lo, hi)

    def predict_members(self, batch: MemberBatch) -> dict[str, np.ndarray]:
        """The registry's serving interface (see pricefuse.pipeline.members)."""
        return {MEMBER: self.predict(batch.parsed)}

    def save(self, directory: Path | str) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, vectorizer in self.vectorizers.items():
            save_vectorizer(vectorizer, directory, f"vectorizer_{name}")
        np.save(directory / "coef.npy", self.coef)
        manifest = {
            "view": self.view,
            "vectorizers": list(self.vectorizers),
            "intercept": self.intercept,
            "clip": list(self.clip),
        }
        path = directory / MANIFEST
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path | str) -> LinearPredictor:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a linear model directory")
        manifest = json.loads(path.read_text())
        vectorizers = {
            name: load_vectorizer(directory, f"vectorizer_{name}")
            for name in manifest["vectorizers"]
        }
        return cls(
            manifest["view"],
            vectorizers,
            np.load(directory / "coef.npy"),
            manifest["intercept"],
            tuple(manifest["clip"]),
        )


@dataclass
class LinearFit:
    """OOF predictions (each fold fitted without it), per-fold SMAPE, and the full fit."""

    oof: np.ndarray
    fold_smape: dict[int, float]
    smape_oof: float
    predictor: LinearPredictor


def fit_linear(
    cfg: LinearConfig,
    parsed: pd.DataFrame,
    y: np.ndarray,
    folds: np.ndarray,
    on_fold_done: Callable[[int], None] | None = None,
) -> LinearFit:
    """K-fold OOF predictions, then one fit on every row for test and serving."""
    y = np.asarray(y, dtype=np.float64)
    folds = np.asarray(folds)
    fold_ids = sorted(set(folds.tolist()))
    if len(fold_ids) < 2 or min(fold_ids) < 0:
        raise ValueError(f"need fold ids 0..K-1 with K >= 2, got {fold_ids}")
    oof = np.zeros(len(y))
    fold_smape: dict[int, float] = {}
    for k in fold_ids:
        held = folds == k
        model = LinearPredictor.fit(cfg, parsed[~held], y[~held])
        oof[held] = model.predict(parsed[held])
        fold_smape[int(k)] = smape_from_log(y[held], oof[held])
        if on_fold_done is not None:
            on_fold_done(int(k))
    full = LinearPredictor.fit(cfg, parsed, y)
    return LinearFit(oof, fold_smape, smape_from_log(y, oof), full)


def train_linear_member(
    cfg: LinearConfig, train: pd.DataFrame, test: pd.DataFrame, layout: Layout
) -> StageRecord:
    """The `train_linear` stage's work: K-fold OOF fit, the full fit saved to its model directory,
    OOF and test predictions written (test through the reloaded predictor, as serving computes
    them); returns what the stage records."""
    from tqdm import tqdm

    if cfg.view not in VIEWS:
        raise StageError(f"linear.view must be one of {', '.join(VIEWS)}, got {cfg.view!r}")
    y, folds = train_targets(train)
    out_dir = layout.model_dir(MEMBER)
    with tqdm(total=len(np.unique(folds)), desc="linear folds", disable=None) as bar:
        fit = fit_linear(cfg, train, y, folds, on_fold_done=lambda k: bar.update())
    shutil.rmtree(out_dir, ignore_errors=True)
    fit.predictor.save(out_dir)
    saved = LinearPredictor.load(out_dir)
    write_member_predictions(
        layout, MEMBER, train[ID], folds, {MEMBER: fit.oof}, test[ID], {MEMBER: saved.predict(test)}
    )
    metrics = {"smape_oof": fit.smape_oof, "n_features": float(len(saved.coef))}
    metrics.update({f"smape_fold_{k}": s for k, s in fit.fold_smape.items()})
    return StageRecord(
        summary=f"linear OOF SMAPE {fit.smape_oof:.3f}% ({len(saved.coef)} n-gram features)",
        metrics=metrics,
        plots=records.member_plots(MEMBER, y, fit.oof),
        artifacts={"linear_model": [out_dir]},
        meta={out_dir: {"smape_oof": fit.smape_oof}},
    )
