"""Stage `ensemble`: combine the members named in `ensemble.members` (blend or stacker, whichever
scores better out of fold: pricefuse.models.ensemble.member), then log the full inference path as
a pyfunc model and register it (pricefuse.serving.model); the new version takes the champion alias
only
if it is not worse than the holder out of fold (pricefuse.recording.registry)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.layout import Layout
from pricefuse.models.ensemble.member import NAME, build_ensemble
from pricefuse.pipeline.members import serving_producers
from pricefuse.recording import tracking
from pricefuse.recording.registry import gate_ensemble_run
from pricefuse.serving.model import input_example, log_price_model

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    inputs = [layout.interim_dir, layout.features_dir]
    inputs += [layout.model_dir(p.name) for p in serving_producers(params)]
    with tracking.stage_run(STAGE, params, inputs=inputs) as run:
        result = build_ensemble(params, layout)
        info = log_price_model(params, layout, test_rows=input_example(params.data.test_csv))
        result.meta[layout.model_dir(NAME)].update(info)
        gate_ensemble_run(params, layout, info, result)
        tracking.record(run, STAGE, result)
