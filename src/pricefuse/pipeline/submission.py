"""Submissions: a file the competition would reject must never be written.

`submit` is the `submit` stage's work: it picks the predictions (`submit.source`), checks them
against the test ids and writes the CSV only when valid. It never calls MLflow tracking; a
rejection raises `SubmissionRejected`, which carries what the stage records before failing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, Layout
from pricefuse.core.lineage import read_meta
from pricefuse.core.records import StageRecord

COLUMNS = ("sample_id", "price")
# test_predictions: the ensemble stage's test.parquet; pyfunc: the logged ensemble model run on
# the raw test rows, exactly as serving would (slower, but proves the served model end to end).
SOURCES = ("test_predictions", "pyfunc")
VALIDATION = "validation.txt"


class SubmissionRejected(StageError):
    """The candidate has problems; nothing was written. `record` is what the stage still logs
    (rows, problem count, `submission_valid` false, validation.txt) before it fails."""

    def __init__(self, problems: list[str], record: StageRecord) -> None:
        super().__init__("submission rejected, nothing written: " + "; ".join(problems))
        self.problems = problems
        self.record = record


def submission_problems(frame: pd.DataFrame, expected_ids: pd.Series | np.ndarray) -> list[str]:
    """Everything wrong with a candidate submission (empty list = valid).

    Valid means: exactly the columns sample_id,price; exactly the test ids, each once; every price
    a positive finite number.
    """
    problems: list[str] = []
    if tuple(frame.columns) != COLUMNS:
        problems.append(f"columns are {list(frame.columns)}, expected {list(COLUMNS)}")
        return problems
    ids = pd.Series(frame["sample_id"])
    expected = pd.Series(np.asarray(expected_ids))
    duplicated = ids[ids.duplicated()].unique()
    if len(duplicated):
        problems.append(f"{len(duplicated)} duplicated sample_id(s), e.g. {list(duplicated[:5])}")
    missing = sorted(set(expected) - set(ids))
    if missing:
        problems.append(f"{len(missing)} test sample_id(s) missing, e.g. {missing[:5]}")
    extra = sorted(set(ids) - set(expected))
    if extra:
        problems.append(f"{len(extra)} sample_id(s) not in the test set, e.g. {extra[:5]}")
    prices = pd.to_numeric(frame["price"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(prices) | (prices <= 0)
    if bad.any():
        examples = list(ids[bad].head(5))
        problems.append(f"{int(bad.sum())} price(s) not positive and finite, e.g. ids {examples}")
    return problems


def write_submission(frame: pd.DataFrame, path: Path | str) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise StageError(f"submit.source must be one of {SOURCES}, got {source!r}")


def read_test_rows(test_csv: str | Path) -> pd.DataFrame:
    """The official test rows: their ids are what a submission must cover, each once."""
    path = Path(test_csv)
    if not path.is_file():
        raise StageError(f"test CSV {path} not found: set data.test_csv in params.yaml")
    rows = pd.read_csv(path)
    if ID not in rows.columns:
        raise StageError(f"test CSV {path} has no {ID} column")
    return rows


ModelLoader = Callable[[str], Any]


def candidate_predictions(
    source: str, layout: Layout, test_rows: pd.DataFrame, load_model: ModelLoader | None = None
) -> pd.DataFrame:
    """(sample_id, price) from `source`, not yet checked.

    `load_model(uri)` loads the logged ensemble for the `pyfunc` source (the stage passes
    MLflow's loader: this module stays free of MLflow)."""
    check_source(source)
    if source == "test_predictions":
        path = layout.test_predictions("ensemble")
        if not path.exists():
            raise StageError(f"{path} not found: run the ensemble stage first (dvc repro)")
        return pd.read_parquet(path, columns=[ID, "price"])
    meta = read_meta(layout.model_dir("ensemble"))
    if not meta.get("model_uri"):
        raise StageError("the ensemble stage recorded no model URI: run it first (dvc repro)")
    if load_model is None:
        raise StageError("submit.source 'pyfunc' needs a model loader (the stage passes one)")
    model = load_model(meta["model_uri"])
    return model.predict(test_rows)[[ID, "price"]]


def submit(
    source: str, layout: Layout, test_rows: pd.DataFrame, load_model: ModelLoader | None = None
) -> StageRecord:
    """Write `layout.submission` from `source` if valid, in the official test order (as the
    starter kit's sample output is); raise `SubmissionRejected` before writing anything if not."""
    frame = candidate_predictions(source, layout, test_rows, load_model)
    test_ids = test_rows[ID]
    problems = submission_problems(frame, test_ids)
    metrics = {"rows": float(len(frame)), "problems": float(len(problems))}
    if problems:
        raise SubmissionRejected(
            problems,
            StageRecord(
                summary=f"submit: {len(problems)} problem(s), see {VALIDATION} in the run",
                metrics=metrics,
                tags={"submission_valid": "false"},
                texts={VALIDATION: "\n".join(problems)},
            ),
        )
    ordered = frame.set_index(ID).loc[test_ids.to_numpy()].reset_index()
    path = write_submission(ordered[[ID, "price"]], layout.submission)
    return StageRecord(
        summary=f"submit: wrote {path} ({len(ordered)} rows, from {source})",
        metrics=metrics,
        tags={"submission_valid": "true"},
        texts={VALIDATION: f"valid: {len(ordered)} rows"},
        artifacts={"submission": [path]},
    )
