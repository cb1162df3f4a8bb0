"""Stage `neighbours`: neighbour-price features for every row (train rows out of fold) and the
`knn` member (pricefuse.models.neighbours.member)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.layout import Layout
from pricefuse.models.neighbours.member import build_neighbours
from pricefuse.pipeline.inputs import load_rows
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    train, test = load_rows(layout, "train"), load_rows(layout, "test")
    with tracking.stage_run(STAGE, params, inputs=[layout.interim_dir, layout.features_dir]) as run:
        result = build_neighbours(params.neighbours, train, test, layout)
        tracking.record(run, STAGE, result)
