"""The `train_fusion` stage's work as a library call: train the fusion head K-fold, save the
fold-averaged predictor, write OOF and test predictions, and return what the stage records.

The model is logged as the predictor directory (`predictor.json` + `fold_k.pt`) under the
artifact path `fusion_model/`, not as an `mlflow.pytorch` model of one fold: the fold-averaged
predictor is what the ensemble and serving use, and `FusionPredictor.load` on the downloaded
directory rebuilds exactly that.
"""

from __future__ import annotations

from pricefuse.core import records
from pricefuse.core.config import FusionConfig, Params
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, Layout
from pricefuse.core.records import PlotData, StageRecord
from pricefuse.models.fusion.inputs import SplitData
from pricefuse.models.fusion.predictor import MANIFEST, FusionPredictor
from pricefuse.models.fusion.training import KFoldResult, train_kfold
from pricefuse.pipeline.inputs import load_stage_rows
from pricefuse.pipeline.predictions import write_member_predictions

MEMBER = "fusion"
MODEL_ARTIFACT_PATH = "fusion_model"


def load_split(params: Params, split: str) -> SplitData:
    """The fusion head's rows of `split`: parsed table (+ neighbour features, + stacked members)
    and its embeddings, via the shared loader; inconsistent arrays are a StageError."""
    try:
        return SplitData.from_batch(load_stage_rows(params, split, MEMBER))
    except ValueError as exc:
        raise StageError(f"{split} inputs: {exc}") from exc


def train_fusion_member(
    cfg: FusionConfig,
    seed: int,
    train: SplitData,
    test: SplitData,
    layout: Layout,
    progress: bool = False,
) -> StageRecord:
    """Train K-fold, save the predictor to the fusion model directory, write OOF and test
    predictions (test through the predictor reloaded from disk, i.e. exactly as the ensemble and
    the served model compute them); return metrics, per-fold curves, plots and the model files."""
    try:
        result = train_kfold(train, cfg, seed, progress=progress)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    out_dir = layout.model_dir(MEMBER)
    manifest = result.predictor.save(out_dir)
    saved = FusionPredictor.load(out_dir)
    test_pred = saved.predict(test.frame, test.text, test.image, test.image_mask)
    write_member_predictions(
        layout,
        MEMBER,
        train.frame[ID],
        result.folds,
        {MEMBER: result.oof},
        test.frame[ID],
        {MEMBER: test_pred},
    )
    folds = ", ".join(f"{s:.2f}" for s in result.fold_smape)
    return StageRecord(
        summary=f"fusion OOF SMAPE {result.smape_oof:.3f}% (folds {folds}) "
        f"in {result.seconds:.0f}s",
        metrics=_metrics(result),
        step_metrics={
            f"{series}_{fold}": curve
            for fold, history in result.histories.items()
            for series, curve in history.as_series().items()
        },
        plots=_plots(train, result),
        artifacts={MODEL_ARTIFACT_PATH: [manifest, *sorted(out_dir.glob("fold_*.pt"))]},
        meta={
            out_dir: {
                "smape_oof": result.smape_oof,
                "fold_smape": result.fold_smape,
                "model_artifact_path": MODEL_ARTIFACT_PATH,
                "manifest": MANIFEST,
            }
        },
    )


def _metrics(result: KFoldResult) -> dict[str, float]:
    metrics = {"smape_oof": result.smape_oof, "train_seconds": result.seconds}
    for k, (fold, history) in enumerate(result.histories.items()):
        metrics[f"smape_fold_{k}"] = result.fold_smape[k]
        metrics[f"best_epoch_{fold}"] = float(history.best_epoch)
    return metrics


def _plots(train: SplitData, result: KFoldResult) -> list[PlotData]:
    """The three plots dvc.yaml declares for train_fusion (plots/train_fusion/<name>.csv)."""
    curves = {fold: history.as_series() for fold, history in result.histories.items()}
    return records.member_plots(MEMBER, train.target, result.oof, curves)
