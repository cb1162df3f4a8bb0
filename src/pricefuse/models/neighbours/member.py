"""The `neighbours` stage's work: out-of-fold neighbour features for every train row, features
from the all-train index for test rows, and the `knn` member built from them.

Why a stage of its own: the features feed both the boosters and the fusion head, and the index is
what the served model loads, so it is computed once, versioned by DVC, and checked for leaks once.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
from tqdm import tqdm

from pricefuse.core import records
from pricefuse.core.config import NeighboursConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, Layout
from pricefuse.core.metrics import smape_from_log
from pricefuse.core.records import StageRecord
from pricefuse.models.neighbours.predictor import (
    MEMBER,
    NeighbourIndex,
    knn_estimate,
    llm_space_error,
)
from pricefuse.models.neighbours.search import LLM_SPACE, SPACES, NeighbourRows
from pricefuse.models.neighbours.training import oof_features
from pricefuse.pipeline.inputs import train_targets
from pricefuse.pipeline.members import MemberBatch
from pricefuse.pipeline.predictions import write_member_predictions

PRODUCER = "neighbours"


def check_config(cfg: NeighboursConfig) -> None:
    unknown = [s for s in (*cfg.spaces, *cfg.member_spaces) if s not in SPACES]
    if unknown or not set(cfg.member_spaces) <= set(cfg.spaces):
        raise StageError(
            f"neighbours.spaces / member_spaces: unknown {unknown or ''} (known: "
            f"{', '.join(SPACES)}); member_spaces must be among spaces"
        )
    if cfg.k < 1:
        raise StageError("neighbours.k must be >= 1")
    if cfg.n_jobs < -1:
        raise StageError("neighbours.n_jobs must be >= 1, or 0 / -1 for every core")


def _rows(batch: MemberBatch) -> NeighbourRows:
    return NeighbourRows(batch.parsed, batch.text, batch.image, batch.image_mask, batch.llm)


def build_neighbours(
    cfg: NeighboursConfig, train: MemberBatch, test: MemberBatch, layout: Layout
) -> StageRecord:
    """Features (data.neighbours_dir), the saved index and the knn member's predictions
    (model_dir("neighbours")); test features come from the saved index, as serving computes them."""
    check_config(cfg)
    if LLM_SPACE in cfg.spaces and (train.llm is None or test.llm is None):
        raise StageError(llm_space_error())
    y, folds = train_targets(train.parsed)
    out_dir = layout.model_dir(PRODUCER)
    started = time.perf_counter()
    # Rows given features (each fold's held train rows, then the test rows), so the bar reads
    # rows/s with an ETA over the folds and the all-train index.
    n_test = len(test.parsed)
    with tqdm(total=len(y) + n_test, desc="neighbours", unit="row", disable=None) as bar:

        def advance(k: int) -> None:
            bar.set_postfix_str(f"fold {k} done", refresh=False)
            bar.update(int(np.sum(folds == k)))

        train_features = oof_features(cfg, _rows(train), y, folds, advance)
        shutil.rmtree(out_dir, ignore_errors=True)
        NeighbourIndex.fit(cfg, _rows(train), y).save(out_dir)
        test_features = NeighbourIndex.load(out_dir).features(_rows(test))
        bar.set_postfix_str("test rows done", refresh=False)
        bar.update(n_test)
    seconds = time.perf_counter() - started

    features_dir = layout.neighbour_features("train").parent
    features_dir.mkdir(parents=True, exist_ok=True)
    for split, batch, features in (("train", train, train_features), ("test", test, test_features)):
        features.insert(0, ID, batch.parsed[ID].to_numpy())
        features.to_parquet(layout.neighbour_features(split), index=False)
    oof = knn_estimate(train_features, cfg.member_spaces)
    test_pred = knn_estimate(test_features, cfg.member_spaces)
    write_member_predictions(
        layout,
        PRODUCER,
        train.parsed[ID],
        folds,
        {MEMBER: oof},
        test.parsed[ID],
        {MEMBER: test_pred},
    )
    metrics = {"smape_oof": smape_from_log(y, oof), "seconds": seconds}
    for space in cfg.spaces:
        column = train_features[f"nbr_{space}_mean"].to_numpy()
        ok = np.isfinite(column)
        metrics[f"coverage_{space}"] = float(ok.mean())
        if ok.any():
            metrics[f"smape_oof_{space}"] = smape_from_log(y[ok], column[ok])
    for k in sorted(set(folds.tolist())):
        held = folds == k
        metrics[f"smape_fold_{k}"] = smape_from_log(y[held], oof[held])
    per_space = ", ".join(
        f"{s} {metrics[f'smape_oof_{s}']:.2f}" for s in cfg.spaces if f"smape_oof_{s}" in metrics
    )
    return StageRecord(
        summary=(
            f"neighbours: knn OOF SMAPE {metrics['smape_oof']:.3f}% (per space: {per_space}) "
            f"in {seconds:.1f}s"
        ),
        metrics=metrics,
        plots=records.member_plots(MEMBER, y, oof),
        meta={
            out_dir: {"smape_oof": metrics["smape_oof"]},
            features_dir: {"spaces": list(cfg.spaces)},
        },
    )
