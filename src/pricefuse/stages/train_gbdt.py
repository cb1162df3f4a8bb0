"""Stage `train_gbdt`: tabular + PCA features, every configured booster on the shared folds
(pricefuse.models.gbdt.training).

Writes the servable GbdtPredictor to model_dir("gbdt") with OOF and test predictions (log1p, one
column per booster) and records per-booster SMAPEs, importance, pred-vs-actual and SMAPE-by-decile
plots, the model directory (artifact path `gbdt_model/`) and each booster's fold-0 model in its
MLflow flavor.
"""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.layout import Layout
from pricefuse.models.gbdt.member import PRODUCER, train_gbdt_members
from pricefuse.pipeline.inputs import load_stage_rows, stage_upstream
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    train = load_stage_rows(params, "train", PRODUCER)
    test = load_stage_rows(params, "test", PRODUCER)
    upstream = stage_upstream(params, PRODUCER)
    with tracking.stage_run(STAGE, params, upstream, "gbdt.device") as run:
        result = train_gbdt_members(params.gbdt, params.seed, train, test, Layout(params.data))
        tracking.record(run, STAGE, result)
