"""Split-conformal price intervals (pricefuse.models.ensemble.intervals) and their serving
surface."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

from pricefuse.core.records import PlotData
from pricefuse.models.ensemble.blend import LOG_CLIP, to_price
from pricefuse.models.ensemble.intervals import (
    GROUPS,
    MIN_GROUP_ROWS,
    REPORT_LEVELS,
    ConformalCalibration,
    IntervalLevelError,
    check_level,
    conformal_quantile,
    coverage_curve,
    coverage_table,
    interval_metrics,
)
from pricefuse.serving.limits import RequestLimits
from pricefuse.serving.model import PARAM_LEVEL, PriceEnsembleModel, model_signature
from tests.conftest import REPO_ROOT
from tests.support import project_params


def synthetic_oof(n: int, seed: int, image_share: float = 0.6, n_folds: int = 5):
    """log prices, OOF-like predictions whose error is larger without an image (heavy-tailed,
    as real residuals are), the image mask and fold ids."""
    rng = np.random.default_rng(seed)
    y_log = np.clip(rng.normal(3.0, 1.0, n), 0.5, 8.0)  # prices of $0.65 to $3,000
    has_image = rng.random(n) < image_share
    scale = np.where(has_image, 0.35, 0.6)
    log_pred = y_log + scale * rng.standard_t(4, n)
    return y_log, log_pred, has_image, rng.integers(0, n_folds, n)


def test_nominal_80_percent_covers_78_to_82_percent_of_oof_rows():
    y_log, log_pred, has_image, folds = synthetic_oof(20_000, seed=0)
    table = coverage_table(y_log, log_pred, has_image, folds, [0.8])
    for row in table.itertuples():
        assert 0.8 <= row.in_sample <= 0.82, row  # >= level: the finite-sample guarantee
        assert 0.78 <= row.cross_fitted <= 0.82, row  # calibrated on the other folds
    # the groups differ, so one pooled band would miss: text-only rows get a wider interval
    width = table.set_index("scope")["width_pct"]
    assert width["text_only"] > 1.3 * width["image"]


def test_finite_sample_rank_and_an_unbounded_interval_when_rows_are_too_few():
    residuals = np.arange(1.0, 10.0)  # n = 9
    assert conformal_quantile(residuals, 0.8) == 8.0  # ceil(10 * 0.8) = 8, not ceil(7.2)
    assert conformal_quantile(residuals, 0.7) == 7.0  # 10 * 0.7 = 7.000000000000001
    assert conformal_quantile(residuals, 0.05) == 1.0
    assert conformal_quantile(residuals, 0.95) == math.inf  # rank 10 > n
    cal = ConformalCalibration(
        {g: residuals for g in GROUPS}, {g: 9 for g in GROUPS}, pooled=GROUPS
    )
    low, high = cal.interval(np.array([3.0]), np.array([True]), 0.95)
    assert (low[0], high[0]) == pytest.approx(to_price(np.array(LOG_CLIP)))


def test_interval_contains_the_price_and_widens_with_the_level():
    y_log, log_pred, has_image, _ = synthetic_oof(2_000, seed=1)
    cal = ConformalCalibration.fit(y_log, log_pred, has_image)
    price = to_price(log_pred)
    previous = np.zeros(len(price))
    for level in (0.5, 0.8, 0.95):
        low, high = cal.interval(log_pred, has_image, level)
        assert (low > 0).all() and (low <= price).all() and (price <= high).all()
        assert (high - low >= previous).all()
        previous = high - low
    # a prediction far outside the price range is clipped like to_price before widening
    low, high = cal.interval(np.array([50.0]), np.array([False]), 0.8)
    assert high[0] == pytest.approx(to_price(np.array([LOG_CLIP[1]]))[0])
    assert low[0] < high[0]


def test_small_group_uses_the_pooled_residuals():
    y_log, log_pred, _, _ = synthetic_oof(500, seed=2)
    has_image = np.zeros(500, dtype=bool)
    has_image[: MIN_GROUP_ROWS - 1] = True
    cal = ConformalCalibration.fit(y_log, log_pred, has_image)
    assert cal.pooled == ("image",)
    assert cal.rows == {"image": MIN_GROUP_ROWS - 1, "text_only": 500 - MIN_GROUP_ROWS + 1}
    assert len(cal.residuals["image"]) == 500
    has_image[:MIN_GROUP_ROWS] = True
    assert ConformalCalibration.fit(y_log, log_pred, has_image).pooled == ()


def test_saved_without_pickle_and_answers_any_level_after_loading(tmp_path):
    y_log, log_pred, has_image, _ = synthetic_oof(1_000, seed=3)
    cal = ConformalCalibration.fit(y_log, log_pred, has_image)
    cal.save(tmp_path)
    loaded = ConformalCalibration.load(tmp_path)
    assert loaded.rows == cal.rows and loaded.pooled == cal.pooled
    for level in (0.123, 0.8, 0.99):
        np.testing.assert_array_equal(
            loaded.interval(log_pred, has_image, level), cal.interval(log_pred, has_image, level)
        )
    with pytest.raises(FileNotFoundError, match="without intervals"):
        ConformalCalibration.load(tmp_path / "elsewhere")


@pytest.mark.parametrize("level", [0, 1, 1.0, -0.2, 1.5, math.nan, math.inf, "high", None, True])
def test_levels_outside_0_1_are_refused_by_name(level):
    with pytest.raises(IntervalLevelError, match=r"interval_level .*strictly between 0 and 1"):
        check_level(level)


def test_metrics_and_plot_match_what_dvc_yaml_declares(tmp_path):
    y_log, log_pred, has_image, folds = synthetic_oof(3_000, seed=4)
    table = coverage_table(y_log, log_pred, has_image, folds, [0.1, *REPORT_LEVELS])
    metrics = interval_metrics(table)
    for level in (50, 80, 90, 95):
        for suffix in ("", "_image", "_text_only"):
            for kind in ("coverage", "coverage_cv", "width_pct"):
                assert np.isfinite(metrics.pop(f"interval_{kind}_{level}{suffix}"))
    assert metrics == {}  # 0.1 is plotted, not logged
    frame = coverage_curve(table)
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    [declared] = [p for p in dvc["plots"] if "plots/ensemble/interval_coverage.csv" in p]
    spec = declared["plots/ensemble/interval_coverage.csv"]
    assert {spec["x"], *spec["y"]} <= set(frame.columns)
    written = PlotData("interval_coverage", "coverage", frame, "t").write(tmp_path)
    assert [p.name for p in written] == ["interval_coverage.csv", "interval_coverage.png"]
    assert pd.read_csv(written[0])["nominal"].tolist() == [0.1, *REPORT_LEVELS]


def test_signature_carries_the_level_param_with_its_default():
    [spec] = model_signature(0.8).params.params
    assert (spec.name, spec.dtype.name, spec.default) == (PARAM_LEVEL, "double", 0.8)
    outputs = [c.name for c in model_signature(0.9).outputs.inputs]
    assert outputs == ["price", "price_low", "price_high", "image_used", "image_status"]
    with pytest.raises(IntervalLevelError, match="interval_level"):
        model_signature(1.2)


@pytest.mark.parametrize("level", [0.0, 1.0, -1.0, math.nan])
def test_served_model_refuses_a_bad_level_before_any_work(level):
    """The level is checked with the rows, before the encoders run (this model has none)."""
    model = PriceEnsembleModel()
    model.params = project_params()
    model.limits = RequestLimits.from_config(model.params.serving)
    rows = pd.DataFrame({"catalog_content": ["Item Name: tea"]})
    with pytest.raises(MlflowException, match="interval_level") as caught:
        model.predict(None, rows, params={PARAM_LEVEL: level})
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
