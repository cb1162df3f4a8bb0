"""The `train_text` stage's work as a library call: fine-tune the text regressor K-fold (resuming
finished folds), save the serving model, write OOF and test predictions (and, when asked, the
OOF-safe fine-tuned embeddings), and return what the stage records.

The member trains only when `text` is in `ensemble.members` (`text_enabled`): fine-tuning a
transformer K times is the one stage that needs a GPU at full size, so it is opt-in, and a disabled
run records that in seconds (`disabled_text_member`), keeping the DVC pipeline whole.

Exported embeddings (`text.export_embeddings: true`) land in `layout.text_member_embeddings_dir`
(`data/models/text_embeddings/`, a DVC output of its own, so the served model, which ships the
model directory, does not carry them): `train.npy` (each row's pooled vector from the fold model
that did not see it) and `test.npy` (from the serving model(s)), float32, rows in the order of the
parsed tables (`data/interim/{train,test}.parquet`), with their row hashes in its meta.json. They
are a feature block for the boosters or the fusion head, which do not read them yet.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pricefuse.core import records
from pricefuse.core.config import Params, TextConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, Layout
from pricefuse.core.records import PlotData, StageRecord
from pricefuse.core.rows import row_hash
from pricefuse.models.text.backbones import KINDS, POOLINGS, TextBackbone
from pricefuse.models.text.data import by_length, render_texts, template_fields
from pricefuse.models.text.precision import PREFERENCES, reload_tolerance
from pricefuse.models.text.predictor import MANIFEST, MEMBER, TextPredictor, write_manifest
from pricefuse.models.text.schedules import SCHEDULES
from pricefuse.models.text.training import TextFit, train_text_kfold
from pricefuse.pipeline.inputs import train_targets
from pricefuse.pipeline.predictions import write_member_predictions

MODEL_ARTIFACT_PATH = "text_model"
CURVES = ("train_loss", "val_smape")


def text_enabled(params: Params) -> bool:
    """The switch: the member trains only when the ensemble uses it."""
    return MEMBER in params.ensemble.members


def check_config(cfg: TextConfig) -> None:
    """Fail before loading any model on a parameter the run could only trip over later."""
    problems = []
    if cfg.kind not in KINDS:
        problems.append(f"text.kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    if cfg.pooling not in POOLINGS:
        problems.append(f"text.pooling must be one of {', '.join(POOLINGS)}, got {cfg.pooling!r}")
    if cfg.schedule not in SCHEDULES:
        problems.append(f"text.schedule must be one of {', '.join(SCHEDULES)}")
    if not 0 <= cfg.frozen_epochs < max(cfg.epochs, 1):
        problems.append("text.frozen_epochs must be in 0..epochs-1 (the backbone must train)")
    if cfg.mixed_precision not in PREFERENCES:
        problems.append(
            f"text.mixed_precision must be one of {', '.join(PREFERENCES)}, "
            f"got {cfg.mixed_precision!r}"
        )
    for name in ("batch_size", "predict_batch_size", "grad_accum", "epochs", "log_every"):
        if getattr(cfg, name) < 1:
            problems.append(f"text.{name} must be >= 1")
    try:
        template_fields(cfg.template)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise StageError("; ".join(problems))


def disabled_text_member(layout: Layout) -> StageRecord:
    """What a run records while `text` is not an ensemble member: no training, no predictions
    (stale ones are removed so no report picks them up); checkpoints stay for a later run."""
    out_dir = layout.model_dir(MEMBER)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (
        layout.oof_predictions(MEMBER),
        layout.test_predictions(MEMBER),
        out_dir / MANIFEST,
    ):
        stale.unlink(missing_ok=True)
    embeddings = _clear_embeddings(layout)
    return StageRecord(
        summary="text member disabled: add `text` to ensemble.members to fine-tune it "
        "(docs/models.md, the text member)",
        meta={out_dir: {"enabled": False}, embeddings: {"exported": False}},
    )


def train_text_member(
    cfg: TextConfig,
    train: pd.DataFrame,
    test: pd.DataFrame,
    layout: Layout,
    accelerator: Any,
    progress: bool = False,
) -> StageRecord:
    """Train (or resume) K folds and the serving model, save the predictor, write OOF and test
    predictions; on processes other than the main one, train and return an empty record."""
    check_config(cfg)
    y, folds = train_targets(train)
    out_dir = layout.model_dir(MEMBER)
    try:
        fit = train_text_kfold(
            cfg,
            render_texts(train, cfg.template),
            y,
            folds,
            train[ID],
            render_texts(test, cfg.template),
            out_dir,
            accelerator,
            progress=progress,
        )
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    if not accelerator.is_main_process:
        return StageRecord(summary="")
    manifest = write_manifest(out_dir, cfg, fit.serving_files)
    check_reloaded(
        out_dir,
        test,
        fit.test,
        mixed=str(accelerator.mixed_precision),
        backbone=fit.backbone,
        device=accelerator.device,
    )
    fit.backbone = None  # the model's memory goes with the last reference
    write_member_predictions(
        layout, MEMBER, train[ID], folds, {MEMBER: fit.oof}, test[ID], {MEMBER: fit.test}
    )
    embeddings = _write_embeddings(layout, fit, train, test)
    folds_text = ", ".join(f"{s:.2f}" for s in fit.fold_smape.values())
    resumed = f"; resumed {', '.join(fit.resumed)}" if fit.resumed else ""
    return StageRecord(
        summary=f"text OOF SMAPE {fit.smape_oof:.3f}% (folds {folds_text}) in {fit.seconds:.0f}s "
        f"on {accelerator.num_processes} process(es) in {fit.precision}{resumed}",
        metrics=_metrics(fit),
        step_metrics={
            f"{series}_{name}": curve
            for name, history in fit.histories.items()
            for series, curve in history.items()
            if curve  # step_loss stays empty in an epoch of fewer than text.log_every steps
        },
        plots=_plots(y, fit),
        artifacts={MODEL_ARTIFACT_PATH: [manifest, *fit.serving_files]},
        meta={
            out_dir: {
                "enabled": True,
                "smape_oof": fit.smape_oof,
                "fold_smape": list(fit.fold_smape.values()),
                "combine": "refit" if cfg.refit else "fold_mean",
                "resumed": fit.resumed,
                "num_processes": accelerator.num_processes,
                "precision": fit.precision,
                "model_artifact_path": MODEL_ARTIFACT_PATH,
                "manifest": MANIFEST,
            },
            layout.text_member_embeddings_dir: embeddings,
        },
        params={"text_num_processes": accelerator.num_processes, "text_precision": fit.precision},
    )


def check_reloaded(
    out_dir: Path,
    test: pd.DataFrame,
    expected: np.ndarray,
    mixed: str = "no",
    backbone: TextBackbone | None = None,
    device: Any = None,
) -> None:
    """The saved predictor must answer what the run computed: serving reads only what is saved.

    It re-predicts the run's first test batch (the `predict_batch_size` longest rows, which the
    run predicted as one batch) through the path the run took: same batch, same shapes, same
    autocast (`mixed`, the run's), on the run's backbone (`backbone`, reused rather than
    loaded again; its trainable state comes from the saved checkpoints). A sound run therefore
    reproduces its numbers up to the dtype's rounding (`reload_tolerance`); a checkpoint that
    lost or mixed up weights does not."""
    if not len(test):
        return
    predictor = TextPredictor.load(out_dir, backbone=backbone, mixed=mixed, device=device)
    ids = predictor.tokenize(test)
    batch = np.sort(by_length(ids, np.arange(len(ids)))[: predictor.cfg.predict_batch_size])
    compare_reloaded(predictor.predict(test.iloc[batch]), np.asarray(expected)[batch], mixed)


def compare_reloaded(got: np.ndarray, expected: np.ndarray, mixed: str) -> None:
    """StageError unless the reloaded predictions match within `reload_tolerance(mixed)`."""
    tolerance = reload_tolerance(mixed)
    worst = float(np.max(np.abs(np.asarray(got) - np.asarray(expected)), initial=0.0))
    if not np.isfinite(got).all() or worst > tolerance:
        raise StageError(
            f"the saved text model predicts {got[:3]} on the first test rows, the run computed "
            f"{expected[:3]} (largest difference {worst:.3g} > {tolerance:.3g}, {mixed} "
            "autocast): saving lost something"
        )


def _clear_embeddings(layout: Layout) -> Path:
    """The embeddings directory, emptied: a DVC output, present even when nothing is exported."""
    directory = layout.text_member_embeddings_dir
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _write_embeddings(
    layout: Layout, fit: TextFit, train: pd.DataFrame, test: pd.DataFrame
) -> dict[str, Any]:
    """Write the OOF-safe train and the test embeddings; returns facts for their meta.json."""
    _clear_embeddings(layout)
    if fit.oof_pooled is None or fit.test_pooled is None:
        return {"exported": False}
    np.save(layout.text_member_embeddings("train"), fit.oof_pooled.astype(np.float32))
    np.save(layout.text_member_embeddings("test"), fit.test_pooled.astype(np.float32))
    return {
        "exported": True,
        "dim": int(fit.oof_pooled.shape[1]),
        "row_hash_train": row_hash(train[ID].tolist()),
        "row_hash_test": row_hash(test[ID].tolist()),
    }


def _metrics(fit: TextFit) -> dict[str, float]:
    metrics = {
        "smape_oof": fit.smape_oof,
        "train_seconds": fit.seconds,
        "resumed_models": float(len(fit.resumed)),
    }
    metrics.update({f"smape_fold_{k}": s for k, s in fit.fold_smape.items()})
    return metrics


def _plots(y: np.ndarray, fit: TextFit) -> list[PlotData]:
    """The three plots dvc.yaml declares for train_text (plots/train_text/<name>.csv)."""
    fold_curves = {
        name: {s: h[s] for s in CURVES if s in h}
        for name, h in fit.histories.items()
        if name.startswith("fold_")
    }
    return records.member_plots(MEMBER, y, fit.oof, fold_curves)
