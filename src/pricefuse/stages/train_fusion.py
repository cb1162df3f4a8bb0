"""Stage `train_fusion`: K-fold training of the gated fusion head on the parsed tables and
embeddings (pricefuse.models.fusion.member)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.layout import Layout
from pricefuse.models.fusion.member import MEMBER, load_split, train_fusion_member
from pricefuse.pipeline.inputs import stage_upstream
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    train, test = load_split(params, "train"), load_split(params, "test")
    upstream = stage_upstream(params, MEMBER)
    with tracking.stage_run(STAGE, params, upstream, "fusion.device") as run:
        result = train_fusion_member(params.fusion, params.seed, train, test, layout, progress=True)
        tracking.record(run, STAGE, result)
