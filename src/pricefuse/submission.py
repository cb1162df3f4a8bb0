"""Submission checks: a file the competition would reject must never be written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ("sample_id", "price")


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
