"""Per-fold tabular features: each fold's rows featurized by a featurizer fitted without them.

Why per fold: the featurizer fits PCA bases and category vocabularies. Fitted on every train row,
it would let each OOF prediction see its own fold through them; fitted on the other folds, held
rows are featurized exactly as test rows are (benchmarks/gbdt_leak.py measures the difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pricefuse.core.config import GbdtConfig
from pricefuse.features.tabular import Embeddings, FeatureMatrix, TabularFeaturizer


@dataclass(frozen=True)
class FoldFeatures:
    """One fold's feature matrices, all built by the featurizer fitted on the fold's fit rows."""

    fold: int
    held: np.ndarray  # boolean mask of the fold's rows
    featurizer: TabularFeaturizer
    x_fit: FeatureMatrix
    x_held: FeatureMatrix
    x_test: FeatureMatrix | None = None


def fold_features(
    train: pd.DataFrame,
    emb: Embeddings,
    folds: np.ndarray,
    cfg: GbdtConfig,
    seed: int,
    test: pd.DataFrame | None = None,
    test_emb: Embeddings | None = None,
) -> list[FoldFeatures]:
    """Per fold: fit the featurizer on the other folds, featurize fit, held and test rows."""
    if (test is None) != (test_emb is None):
        raise ValueError("pass both the test table and its embeddings, or neither")
    folds = np.asarray(folds)
    if len(folds) != len(train):
        raise ValueError(f"rows differ: table {len(train)}, folds {len(folds)}")
    fold_ids = tuple(int(k) for k in np.unique(folds))
    if len(fold_ids) < 2 or (folds < 0).any():
        raise ValueError(f"need >= 2 folds and every train row in one; got folds {fold_ids}")
    out = []
    for k in fold_ids:
        held = folds == k
        fit_rows, fit_emb = train[~held], emb.take(~held)
        featurizer = TabularFeaturizer(cfg.text_pca, cfg.image_pca, seed, cfg.llm_pca)
        featurizer.fit(fit_rows, fit_emb)
        x_test = None
        if test is not None and test_emb is not None:
            x_test = featurizer.transform(test, test_emb)
        out.append(
            FoldFeatures(
                k,
                held,
                featurizer,
                featurizer.transform_fit_rows(fit_rows, fit_emb),
                featurizer.transform(train[held], emb.take(held)),
                x_test,
            )
        )
    return out
