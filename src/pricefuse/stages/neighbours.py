"""Stage `neighbours`: neighbour-price features for every row and the `knn` member.

Train rows get out-of-fold features (their neighbours and the TF-IDF vocabularies come from the
other folds only); test rows get features from an index over every train row, which is also what
the served model loads. Writes the features (`data.neighbours_dir`), the index and the member's
OOF/test predictions (model_dir("neighbours")).
"""

from __future__ import annotations

import shutil
import time

import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from pricefuse import plots, tracking
from pricefuse.config import Params
from pricefuse.errors import StageError
from pricefuse.features.neighbours import (
    MEMBER,
    SPACES,
    NeighbourIndex,
    NeighbourRows,
    knn_estimate,
    oof_features,
)
from pricefuse.inputs import load_rows, train_targets
from pricefuse.layout import FOLD, ID, PLOTS_DIR, Layout
from pricefuse.members import MemberBatch
from pricefuse.metrics import smape_from_log

STAGE = "neighbours"


def _rows(batch: MemberBatch) -> NeighbourRows:
    return NeighbourRows(batch.parsed, batch.text, batch.image, batch.image_mask)


def run(params: Params) -> None:
    cfg = params.neighbours
    unknown = [s for s in (*cfg.spaces, *cfg.member_spaces) if s not in SPACES]
    if unknown or not set(cfg.member_spaces) <= set(cfg.spaces):
        raise StageError(
            f"neighbours.spaces / member_spaces: unknown {unknown or ''} (known: "
            f"{', '.join(SPACES)}); member_spaces must be among spaces"
        )
    if cfg.k < 1:
        raise StageError("neighbours.k must be >= 1")
    layout = Layout(params.data)
    train, test = load_rows(layout, "train"), load_rows(layout, "test")
    y, folds = train_targets(train.parsed)
    out_dir = layout.model_dir(STAGE)
    upstream = [layout.interim_dir, layout.features_dir]
    with tracking.stage_run(STAGE, params, inputs=upstream) as run:
        started = time.perf_counter()
        with tqdm(total=len(np.unique(folds)) + 1, desc="neighbour folds", disable=None) as bar:
            train_features = oof_features(cfg, _rows(train), y, folds, lambda k: bar.update())
            shutil.rmtree(out_dir, ignore_errors=True)
            NeighbourIndex.fit(cfg, _rows(train), y).save(out_dir)
            # Test features from the saved index, exactly as the served model computes them.
            test_features = NeighbourIndex.load(out_dir).features(_rows(test))
            bar.update()
        seconds = time.perf_counter() - started

        features_dir = layout.neighbour_features("train").parent
        features_dir.mkdir(parents=True, exist_ok=True)
        for split, batch, features in (
            ("train", train, train_features),
            ("test", test, test_features),
        ):
            features.insert(0, ID, batch.parsed[ID].to_numpy())
            features.to_parquet(layout.neighbour_features(split), index=False)
        oof = knn_estimate(train_features, cfg.member_spaces)
        test_pred = knn_estimate(test_features, cfg.member_spaces)
        pd.DataFrame({ID: train.parsed[ID], FOLD: folds, MEMBER: oof}).to_parquet(
            layout.oof_predictions(STAGE), index=False
        )
        pd.DataFrame({ID: test.parsed[ID], MEMBER: test_pred}).to_parquet(
            layout.test_predictions(STAGE), index=False
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
        tracking.log_metrics(metrics)
        scatter = plots.pred_vs_actual(
            np.expm1(y), np.expm1(oof), "knn OOF", PLOTS_DIR / "neighbours_pred_vs_actual.png"
        )
        mlflow.log_artifact(str(scatter), "plots")
        tracking.write_meta(out_dir, STAGE, run.info.run_id, smape_oof=metrics["smape_oof"])
        tracking.write_meta(features_dir, STAGE, run.info.run_id, spaces=list(cfg.spaces))
        per_space = ", ".join(
            f"{s} {metrics[f'smape_oof_{s}']:.2f}"
            for s in cfg.spaces
            if f"smape_oof_{s}" in metrics
        )
        print(
            f"neighbours: knn OOF SMAPE {metrics['smape_oof']:.3f}% (per space: {per_space}) "
            f"in {seconds:.1f}s"
        )
