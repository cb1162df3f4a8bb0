"""Stage `submit`: write submission.csv only if the competition would accept it."""

from __future__ import annotations

import mlflow
import pandas as pd

from pricefuse import tracking
from pricefuse.config import Params
from pricefuse.errors import StageError
from pricefuse.layout import ID, Layout
from pricefuse.submission import submission_problems, write_submission

STAGE = "submit"
SOURCES = ("test_predictions", "pyfunc")


def _from_test_predictions(layout: Layout) -> pd.DataFrame:
    path = layout.test_predictions("ensemble")
    if not path.exists():
        raise StageError(f"{path} not found: run the ensemble stage first (dvc repro)")
    return pd.read_parquet(path, columns=[ID, "price"])


def _from_pyfunc(layout: Layout, test_csv: str) -> pd.DataFrame:
    meta = tracking.read_meta(layout.model_dir("ensemble"))
    if not meta.get("model_uri"):
        raise StageError("the ensemble stage recorded no model URI: run it first (dvc repro)")
    model = mlflow.pyfunc.load_model(meta["model_uri"])
    rows = pd.read_csv(test_csv)
    return model.predict(rows)[[ID, "price"]]


def run(params: Params) -> None:
    layout = Layout(params.data)
    source = params.submit.source
    if source not in SOURCES:
        raise StageError(f"submit.source must be one of {SOURCES}, got {source!r}")
    test_ids = pd.read_csv(params.data.test_csv, usecols=[ID])[ID]
    upstream = [layout.model_dir("ensemble")]
    with tracking.stage_run(STAGE, params, inputs=upstream) as run:
        frame = (
            _from_test_predictions(layout)
            if source == "test_predictions"
            else _from_pyfunc(layout, params.data.test_csv)
        )
        problems = submission_problems(frame, test_ids)
        mlflow.log_metrics({"rows": len(frame), "problems": len(problems)})
        mlflow.set_tag("submission_valid", str(not problems).lower())
        if problems:
            mlflow.log_text("\n".join(problems), "validation.txt")
            raise StageError("submission rejected, nothing written: " + "; ".join(problems))
        # Same order as the official test file, as the starter kit's sample output does.
        ordered = frame.set_index(ID).loc[test_ids.to_numpy()].reset_index()
        path = write_submission(ordered[[ID, "price"]], layout.submission)
        mlflow.log_artifact(str(path), "submission")
        mlflow.log_text("valid: " + str(len(ordered)) + " rows", "validation.txt")
        print(f"wrote {path} ({len(ordered)} rows, run {run.info.run_id})")
