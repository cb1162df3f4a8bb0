"""The linear member's persisted predictor: fitted vectorizers + ridge coefficients, saved without
pickle (vocabularies as JSON, IDF vectors and coefficients as .npy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pricefuse.core.config import LinearConfig
from pricefuse.features.ngrams import (
    TfidfRows,
    fit_vectorizer,
    load_vectorizer,
    make_vectorizer,
    save_vectorizer,
    text_view,
)

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
        self._rows: dict[str, TfidfRows] = {}  # per fitted vectorizer, made on first transform

    @staticmethod
    def _vectorizers(cfg: LinearConfig) -> dict[str, object]:
        return {
            "word": make_vectorizer("word", (1, cfg.word_max_ngram), cfg.min_df),
            "char": make_vectorizer(
                "char_wb", cfg.char_ngram, cfg.min_df + 1, cfg.char_max_features
            ),
        }

    def transform(self, parsed: pd.DataFrame) -> Any:
        """The rows' TF-IDF features (a scipy CSR matrix, word then char n-grams).

        Each vectorizer transforms through `TfidfRows` (its own result, without scikit-learn's
        per-call checks), and the blocks join in one CSR stack: the same matrix as the
        vectorizers' own `transform` stacked through COO, at a fraction of a served row's cost.
        """
        from scipy import sparse

        texts = text_view(parsed, self.view)
        blocks = []
        for name, vectorizer in self.vectorizers.items():
            if name not in self._rows:
                self._rows[name] = TfidfRows(vectorizer)
            blocks.append(self._rows[name].transform(texts))
        return sparse.hstack(blocks, format="csr")

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
        return {MEMBER: self.predict(batch.base)}  # text fields only: never the joined columns

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
