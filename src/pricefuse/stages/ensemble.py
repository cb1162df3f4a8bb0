"""Stage `ensemble`: combine the members named in `ensemble.members` (blend or stacker, whichever
scores better out of fold: pricefuse.models.ensemble_build), then log the full inference path as
a pyfunc model and register it (pricefuse.serving)."""

from __future__ import annotations

from pricefuse import tracking
from pricefuse.config import Params
from pricefuse.layout import Layout
from pricefuse.members import serving_producers
from pricefuse.models.ensemble_build import NAME, build_ensemble
from pricefuse.serving import input_example, log_price_model

STAGE = "ensemble"


def run(params: Params) -> None:
    layout = Layout(params.data)
    inputs = [layout.interim_dir, layout.features_dir]
    inputs += [layout.model_dir(p.name) for p in serving_producers(params)]
    with tracking.stage_run(STAGE, params, inputs=inputs) as run:
        result = build_ensemble(params, layout)
        info = log_price_model(params, layout, test_rows=input_example(params.data.test_csv))
        result.meta[layout.model_dir(NAME)].update(info)
        tracking.record(run, STAGE, result)
