"""Stage `submit`: ensemble predictions -> `data.submission_csv`, written only if the competition
would accept it (pricefuse.submission)."""

from __future__ import annotations

from pricefuse import tracking
from pricefuse.config import Params
from pricefuse.layout import Layout
from pricefuse.submission import SubmissionRejected, check_source, read_test_rows, submit

STAGE = "submit"


def run(params: Params) -> None:
    layout = Layout(params.data)
    check_source(params.submit.source)
    test_rows = read_test_rows(params.data.test_csv)
    with tracking.stage_run(STAGE, params, inputs=[layout.model_dir("ensemble")]) as run:
        try:
            result = submit(params.submit.source, layout, test_rows)
        except SubmissionRejected as rejected:
            tracking.record(run, STAGE, rejected.record)  # tag + validation.txt, then fail
            raise
        tracking.record(run, STAGE, result)
