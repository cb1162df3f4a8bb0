"""Stage `ablation`: each member alone, the blend without each member, and the fusion head on
each modality subset (pricefuse.models.ensemble.ablation)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, Layout
from pricefuse.models.ensemble.ablation import run_ablation
from pricefuse.models.fusion.member import load_split
from pricefuse.pipeline.members import UnknownMemberError, selected_members
from pricefuse.pipeline.predictions import member_predictions
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    try:
        members = list(selected_members(params))
    except UnknownMemberError as exc:
        raise StageError(f"ensemble.members: {exc}") from exc
    train = load_split(params, "train")
    oof = member_predictions(params, "train", members, train.frame[ID]).to_numpy()
    upstream = [layout.interim_dir, layout.features_dir, layout.model_dir("ensemble")]
    # Retrains fusion heads (one per modality subset) on `fusion.device`, as train_fusion does.
    with tracking.stage_run(STAGE, params, upstream, "fusion.device") as run:
        variants = params.ablation.fusion_variants
        result = run_ablation(
            params.fusion, params.seed, variants, train, oof, members, params.ablation.max_rows
        )
        tracking.record(run, STAGE, result)
