"""Reports over pipeline outputs (what `pricefuse evaluate` prints)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pricefuse.config import Params
from pricefuse.layout import ID, LOG_PRICE, Layout
from pricefuse.metrics import smape
from pricefuse.models.ensemble import to_price

PRODUCERS = ("fusion", "gbdt", "ensemble")


def oof_report(params: Params) -> pd.DataFrame:
    """OOF SMAPE of every model found in the outputs, the ensemble, and a constant median."""
    layout = Layout(params.data)
    train = pd.read_parquet(layout.parsed("train"), columns=[ID, LOG_PRICE]).set_index(ID)
    y = np.expm1(train[LOG_PRICE].to_numpy())
    rows = [{"model": "constant median", "smape_oof": smape(y, np.full_like(y, np.median(y)))}]
    for producer in PRODUCERS:
        path = layout.oof_predictions(producer)
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
