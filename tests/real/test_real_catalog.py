"""Catalog parsing on the real competition rows (skipped when ../shared/data/amazon2025 is absent).

Its speed is a figure, not an assertion: `python benchmarks/catalog_parse.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.data.catalog import parse_frame


def test_real_train_parses_with_high_unit_coverage(shared_data: Path) -> None:
    raw = pd.read_csv(shared_data / "train.csv")
    out, report = parse_frame(raw)
    assert len(out) == len(raw)
    assert report.unit_coverage > 0.98
    assert report.counts["item_name_missing"] == 0
    assert (out["pack"] >= 1).all()
    assert np.isfinite(out["log_quantity"]).all()
