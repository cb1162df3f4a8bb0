"""Stage `submit`: ensemble predictions -> `data.submission_csv`, written only if the competition
would accept it (pricefuse.pipeline.submission)."""

from __future__ import annotations

from pricefuse.core.config import Params
from pricefuse.core.layout import Layout
from pricefuse.pipeline.submission import SubmissionRejected, check_source, read_test_rows, submit
from pricefuse.recording import tracking

STAGE = __name__.rpartition(".")[2]


def run(params: Params) -> None:
    layout = Layout(params.data)
    check_source(params.submit.source)
    test_rows = read_test_rows(params.data.test_csv)
    with tracking.stage_run(STAGE, params, inputs=[layout.model_dir("ensemble")]) as run:
        try:
            result = submit(params.submit.source, layout, test_rows, tracking.load_pyfunc)
        except SubmissionRejected as rejected:
            tracking.record(run, STAGE, rejected.record)  # tag + validation.txt, then fail
            raise
        tracking.record(run, STAGE, result)
