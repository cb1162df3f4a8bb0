"""The n-gram member: learns from tokens, never sees its own fold, round-trips without pickle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_neighbours import rows

from pricefuse.core.metrics import smape_from_log
from pricefuse.models.linear.predictor import LinearPredictor
from pricefuse.models.linear.training import fit_linear
from tests.support import project_params

CFG = replace(project_params().linear, min_df=1, char_max_features=5000, alpha=1.0)


def test_learns_prices_from_tokens() -> None:
    data, y, folds = rows(500)
    fit = fit_linear(CFG, data.parsed, y, folds)
    constant = smape_from_log(y, np.full_like(y, np.median(y)))
    assert fit.smape_oof < 0.5 * constant
    assert sorted(fit.fold_smape) == [0, 1, 2, 3, 4]


def test_oof_prediction_of_a_row_never_depends_on_its_own_fold() -> None:
    data, y, folds = rows(300)
    r = int(np.flatnonzero(folds == 0)[0])
    baseline = fit_linear(CFG, data.parsed, y, folds).oof[r]

    def perturbed(rows_to_change: np.ndarray) -> float:
        parsed = data.parsed.copy()
        parsed.loc[rows_to_change, "item_name"] = data.parsed.loc[r, "item_name"] + " deluxe"
        values = y.copy()
        values[rows_to_change] = 9.0
        return fit_linear(CFG, parsed, values, folds).oof[r]

    assert perturbed(np.setdiff1d(np.flatnonzero(folds == 0), [r])) == baseline
    assert perturbed(np.flatnonzero(folds == 1)) != pytest.approx(baseline, abs=1e-3)


def test_save_load_predicts_the_same_without_pickle(tmp_path: Path) -> None:
    data, y, folds = rows(200)
    query, _, _ = rows(30, seed=2)
    query.parsed.loc[0, "item_name"] = ""  # an empty name still gets a prediction
    model = fit_linear(CFG, data.parsed, y, folds).predictor
    before = model.predict(query.parsed)
    model.save(tmp_path)
    assert {p.suffix for p in tmp_path.iterdir()} <= {".json", ".npy"}
    np.testing.assert_array_equal(LinearPredictor.load(tmp_path).predict(query.parsed), before)
    assert np.isfinite(before).all()
    assert ((before >= y.min()) & (before <= y.max())).all()
