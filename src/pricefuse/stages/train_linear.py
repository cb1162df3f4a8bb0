"""Stage `train_linear`: the n-gram member (TF-IDF word + char n-grams -> Ridge), K folds for OOF
predictions and one full fit for test and serving (pricefuse.models.linear)."""

from __future__ import annotations

from pricefuse import tracking
from pricefuse.config import Params
from pricefuse.inputs import load_parsed
from pricefuse.layout import Layout
from pricefuse.models.linear import train_linear_member

STAGE = "train_linear"


def run(params: Params) -> None:
    layout = Layout(params.data)
    train, test = load_parsed(layout, "train"), load_parsed(layout, "test")
    with tracking.stage_run(STAGE, params, inputs=[layout.interim_dir]) as run:
        result = train_linear_member(params.linear, train, test, layout)
        tracking.record(run, STAGE, result)
