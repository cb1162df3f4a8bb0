"""Stage `train_linear`: the n-gram member (TF-IDF word + char n-grams -> Ridge), K folds for OOF
predictions and one full fit for test and serving (pricefuse.models.linear.member)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.layout import Layout
from pricefuse.models.linear.member import train_linear_member
from pricefuse.pipeline.inputs import load_parsed
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    train, test = load_parsed(layout, "train"), load_parsed(layout, "test")
    with tracking.stage_run(STAGE, params, inputs=[layout.interim_dir]) as run:
        result = train_linear_member(params.linear, train, test, layout)
        tracking.record(run, STAGE, result)
