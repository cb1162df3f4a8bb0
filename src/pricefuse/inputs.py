"""One loader for what the training stages read: the parsed table of a split, its embeddings and,
when the pipeline uses them, its neighbour features — aligned by row and checked.

Why one loader: every stage that pairs per-row arrays with the parsed table must check the same
things (files present, row-order hash, row counts); a second copy of those checks drifts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pricefuse import tracking
from pricefuse.errors import StageError
from pricefuse.features import row_hash
from pricefuse.layout import FOLD, ID, LOG_PRICE, Layout
from pricefuse.members import MemberBatch


def load_rows(layout: Layout, split: str, neighbours: bool = False) -> MemberBatch:
    """Parsed rows + embeddings of `split` (+ the `nbr_*` columns when `neighbours`)."""
    paths = [
        layout.parsed(split),
        layout.text_embeddings(split),
        layout.image_embeddings(split),
        layout.image_mask(split),
    ]
    if neighbours:
        paths.append(layout.neighbour_features(split))
    absent = [str(p) for p in paths if not p.exists()]
    if absent:
        raise StageError(
            f"missing input(s) {', '.join(absent)}: run the upstream stages first (dvc repro)"
        )
    parsed = pd.read_parquet(paths[0])
    if ID not in parsed.columns:
        raise StageError(f"{paths[0]} has no {ID} column")
    recorded = tracking.read_meta(layout.features_dir).get(f"row_hash_{split}")
    if recorded is not None and recorded != row_hash(parsed[ID].tolist()):
        raise StageError(
            f"{split} embeddings were computed for other rows than {paths[0]} holds "
            "(row hash differs): re-run embed after preprocess"
        )
    text, image = np.load(paths[1]), np.load(paths[2])
    mask = np.load(paths[3]).astype(bool)
    counts = {"text": len(text), "image": len(image), "image_mask": len(mask)}
    if any(n != len(parsed) for n in counts.values()):
        raise StageError(
            f"{split}: {len(parsed)} parsed rows but embedding rows {counts}; "
            "re-run embed after preprocess"
        )
    batch = MemberBatch(parsed, text, image, mask)
    if neighbours:
        features = pd.read_parquet(paths[4])
        if ID not in features.columns or not features[ID].equals(parsed[ID]):
            raise StageError(
                f"{paths[4]} is not aligned with {paths[0]}: re-run the neighbours stage"
            )
        batch = batch.with_columns(features.drop(columns=[ID]))
    return batch


def train_targets(parsed: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(log1p price, fold id) of the train rows, checked: finite targets, folds 0..K-1, K >= 2."""
    absent = [c for c in (LOG_PRICE, FOLD) if c not in parsed.columns]
    if absent:
        raise StageError(f"train table lacks column(s) {', '.join(absent)}")
    y = parsed[LOG_PRICE].to_numpy(dtype=np.float64)
    folds = parsed[FOLD].to_numpy()
    if not np.isfinite(y).all():
        raise StageError(f"{LOG_PRICE} holds NaN or infinite values")
    if (folds < 0).any() or len(np.unique(folds)) < 2:
        raise StageError("train rows need fold ids 0..K-1 with K >= 2 (from preprocess)")
    return y, folds
