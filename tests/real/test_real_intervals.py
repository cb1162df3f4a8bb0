"""Price-interval coverage on the real competition rows (skipped when ../shared is absent).

The OOF vector is the linear (n-gram) member's, fitted here on the preprocess stage's group folds
(`pricefuse.models.linear.training.fit_linear`, default params): the cheapest honest OOF predictions
of the
real rows (about a minute on two cores), calibrated exactly as the ensemble stage calibrates its
own OOF predictions. `has_image` is "a local copy of the row's image exists" (the pipeline's
mask also needs the image to decode). The full-pipeline figures are in metrics/ensemble.json
after `pytest -s tests/real/test_real_pipeline.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.core.layout import HAS_IMAGE, IMAGE_PATH, LOG_PRICE
from pricefuse.data.catalog import parse_frame
from pricefuse.data.preprocess import assign_folds, clean_prices
from pricefuse.models.ensemble.intervals import REPORT_LEVELS, coverage_table
from pricefuse.models.linear.training import fit_linear
from tests.support import project_params


def test_real_oof_80_percent_interval_covers_78_to_82_percent(shared_data: Path) -> None:
    params = project_params()
    train, _drops = clean_prices(
        pd.read_csv(shared_data / "train.csv"), params.preprocess.min_price
    )
    parsed, _report = parse_frame(train)
    names = parsed["image_link"].fillna("").str.rsplit("/", n=1).str[-1]
    local = [shared_data / "images" / n if n else None for n in names]
    parsed[IMAGE_PATH] = [str(p) if p is not None and p.is_file() else "" for p in local]
    parsed[HAS_IMAGE] = parsed[IMAGE_PATH] != ""
    folds, _groups = assign_folds(parsed, params.preprocess.n_folds, params.seed)
    y_log = parsed[LOG_PRICE].to_numpy()
    oof = fit_linear(params.linear, parsed, y_log, folds).oof

    table = coverage_table(y_log, oof, parsed[HAS_IMAGE].to_numpy(), folds, REPORT_LEVELS)
    print(f"\nreal rows: {len(parsed)}, with a local image: {int(parsed[HAS_IMAGE].sum())}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    overall = table[table["scope"] == "all"].set_index("nominal")
    assert 0.8 <= overall.loc[0.8, "in_sample"] <= 0.82
    assert 0.78 <= overall.loc[0.8, "cross_fitted"] <= 0.82
    assert np.isfinite(table["width_pct"]).all()
