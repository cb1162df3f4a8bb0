"""Stage `neighbours`: neighbour-price features for every row (train rows out of fold) and the
`knn` member (pricefuse.models.knn)."""

from __future__ import annotations

from pricefuse import tracking
from pricefuse.config import Params
from pricefuse.inputs import load_rows
from pricefuse.layout import Layout
from pricefuse.models.knn import build_neighbours

STAGE = "neighbours"


def run(params: Params) -> None:
    layout = Layout(params.data)
    train, test = load_rows(layout, "train"), load_rows(layout, "test")
    with tracking.stage_run(STAGE, params, inputs=[layout.interim_dir, layout.features_dir]) as run:
        result = build_neighbours(params.neighbours, train, test, layout)
        tracking.record(run, STAGE, result)
