"""One loader for what the stages read: the parsed table of a split, its embeddings and, when the
pipeline uses them, its neighbour features and stacked members — aligned by row and checked.

Why one loader: every stage that pairs per-row arrays with the parsed table must check the same
things (files present, row-order hash, row counts); a second copy of those checks drifts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.core.config import Params
from pricefuse.core.errors import StageError
from pricefuse.core.layout import FOLD, ID, LOG_PRICE, Layout
from pricefuse.core.lineage import read_meta
from pricefuse.core.rows import row_hash
from pricefuse.pipeline.members import (
    MemberBatch,
    UnknownMemberError,
    check_stack_members,
    producer_of,
    stacked_column,
)


def load_parsed(layout: Layout, split: str) -> pd.DataFrame:
    """The parsed table of `split` written by preprocess, checked for its id column."""
    path = layout.parsed(split)
    if not path.is_file():
        raise StageError(f"{path} not found: run `pricefuse preprocess` first (or dvc repro)")
    parsed = pd.read_parquet(path)
    if ID not in parsed.columns:
        raise StageError(f"{path} has no {ID} column: re-run preprocess")
    return parsed


def _check_row_hash(layout: Layout, split: str, parsed: pd.DataFrame) -> None:
    recorded = read_meta(layout.features_dir).get(f"row_hash_{split}")
    if recorded is not None and recorded != row_hash(parsed[ID].tolist()):
        raise StageError(
            f"{split} embeddings were computed for other rows than {layout.parsed(split)} holds "
            "(row hash differs): re-run embed after preprocess"
        )


def load_image_mask(layout: Layout, split: str, parsed: pd.DataFrame) -> np.ndarray:
    """Which rows of `parsed` have an image embedding (embed's mask), checked like the arrays."""
    path = layout.image_mask(split)
    if not path.is_file():
        raise StageError(f"{path} not found: run `pricefuse embed` first (or dvc repro)")
    _check_row_hash(layout, split, parsed)
    mask = np.load(path).astype(bool)
    if len(mask) != len(parsed):
        raise StageError(f"{split}: {len(parsed)} parsed rows but {len(mask)} image-mask rows")
    return mask


def load_rows(layout: Layout, split: str, neighbours: bool = False) -> MemberBatch:
    """Parsed rows + embeddings of `split` (+ the `nbr_*` columns when `neighbours`), and the LLM
    text block as `llm` when embed wrote it (`embed.llm.model` set; None otherwise)."""
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
            f"missing input(s) {', '.join(absent)}: run preprocess and embed"
            + (" and neighbours" if neighbours else "")
            + " first (or dvc repro)"
        )
    parsed = load_parsed(layout, split)
    _check_row_hash(layout, split, parsed)
    text, image = np.load(paths[1]), np.load(paths[2])
    mask = np.load(paths[3]).astype(bool)
    counts = {"text": len(text), "image": len(image), "image_mask": len(mask)}
    if any(n != len(parsed) for n in counts.values()):
        raise StageError(
            f"{split}: {len(parsed)} parsed rows but embedding rows {counts}; "
            "re-run embed after preprocess"
        )
    llm = _load_llm_block(layout, split, len(parsed))
    batch = MemberBatch(parsed, text, image, mask, llm=llm)
    if neighbours:
        features = pd.read_parquet(paths[4])
        if ID not in features.columns or not features[ID].equals(parsed[ID]):
            raise StageError(
                f"{paths[4]} is not aligned with {paths[0]}: re-run the neighbours stage"
            )
        batch = batch.with_columns(features.drop(columns=[ID]))
    return batch


def _load_llm_block(layout: Layout, split: str, rows: int) -> np.ndarray | None:
    """The LLM block of `split` when its file exists (embed writes it only when configured),
    checked for its row count (its row order is the parsed table's, hashed with the others)."""
    path = layout.llm_embeddings(split)
    if not path.is_file():
        return None
    llm = np.load(path)
    if llm.ndim != 2 or len(llm) != rows:
        raise StageError(
            f"{split}: {rows} parsed rows but the LLM block {path} has shape {llm.shape}; "
            "re-run embed after preprocess"
        )
    return llm


def load_stage_rows(params: Params, split: str, consumer: str) -> MemberBatch:
    """What producer `consumer` trains or predicts on: parsed rows + embeddings, the neighbour
    features when `neighbours.as_features`, and the predictions of `<consumer>.stack_members`
    as `member_<name>` columns (OOF on train, full fit on test: what serving computes)."""
    from pricefuse.pipeline.predictions import member_predictions

    batch = load_rows(Layout(params.data), split, neighbours=params.neighbours.as_features)
    try:
        stacked = check_stack_members(params, consumer)
    except UnknownMemberError as exc:
        raise StageError(f"{consumer}.stack_members: {exc}") from exc
    if stacked:
        predictions = member_predictions(params, split, stacked, batch.parsed[ID])
        batch = batch.with_columns(predictions.rename(columns=stacked_column))
    return batch


def stage_upstream(params: Params, consumer: str) -> list[Path]:
    """The upstream directories a training stage reads (for the lineage tags)."""
    layout = Layout(params.data)
    dirs = [layout.interim_dir, layout.features_dir]
    if params.neighbours.as_features:
        dirs.append(layout.neighbour_features("train").parent)
    dirs += [
        layout.model_dir(producer_of(m, params).name) for m in check_stack_members(params, consumer)
    ]
    return dirs


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
