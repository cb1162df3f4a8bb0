"""Reports over pipeline outputs (what `pricefuse evaluate` prints)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.core.config import Params
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, LOG_PRICE, Layout
from pricefuse.core.metrics import smape
from pricefuse.models.ensemble.blend import to_price
from pricefuse.models.ensemble.diversity import error_correlation
from pricefuse.pipeline.members import PRODUCERS, selected_members
from pricefuse.pipeline.predictions import member_predictions

ABLATION_FILE = "metrics/ablation.json"


def oof_report(params: Params) -> pd.DataFrame:
    """OOF SMAPE of every member found in the outputs, the ensemble, and a constant median."""
    layout = Layout(params.data)
    train = pd.read_parquet(layout.parsed("train"), columns=[ID, LOG_PRICE]).set_index(ID)
    y = np.expm1(train[LOG_PRICE].to_numpy())
    rows = [{"model": "constant median", "smape_oof": smape(y, np.full_like(y, np.median(y)))}]
    for name in [p.name for p in PRODUCERS] + ["ensemble"]:
        path = layout.oof_predictions(name)
        if not path.exists():
            continue
        frame = pd.read_parquet(path).set_index(ID).reindex(train.index)
        for column in frame.columns:
            if column == "fold" or frame[column].isna().any():
                continue
            rows.append({"model": column, "smape_oof": smape(y, to_price(frame[column]))})
    report = pd.DataFrame(rows)
    report["smape_oof"] = report["smape_oof"].round(3)
    return report


def error_correlation_report(params: Params) -> pd.DataFrame | None:
    """The correlation of the OOF log errors of `ensemble.members` (None before every member's
    predictions exist)."""
    layout = Layout(params.data)
    members = list(selected_members(params))
    train = pd.read_parquet(layout.parsed("train"), columns=[ID, LOG_PRICE])
    try:
        oof = member_predictions(params, "train", members, train[ID])
    except StageError:  # a member's predictions are missing: nothing to correlate yet
        return None
    return error_correlation(train[LOG_PRICE].to_numpy(), {m: oof[m].to_numpy() for m in members})


def ablation_report(path: Path | str = ABLATION_FILE) -> pd.DataFrame | None:
    """The ablation table from the `ablation` stage's metrics file, or None before it ran."""
    file = Path(path)
    if not file.exists():
        return None
    metrics = json.loads(file.read_text(encoding="utf-8"))
    rows = [
        {
            "group": key.split("/", 1)[0].replace("_", " "),
            "name": key.split("/", 1)[1].replace("_", " "),
            "smape_oof": value,
        }
        for key, value in metrics.items()
        if "/" in key
    ]
    return pd.DataFrame(rows, columns=["group", "name", "smape_oof"])
