"""The members' error correlation table the ensemble stage records and `evaluate` prints."""

from __future__ import annotations

import numpy as np
import pytest

from pricefuse.models.ensemble.diversity import (
    as_plot_frame,
    error_correlation,
    format_table,
    mean_pairwise,
)


def test_members_that_err_alike_correlate_and_independent_ones_do_not() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(3.0, 1.0, size=5000)
    shared = rng.normal(size=5000)
    predictions = {
        "a": y + shared,
        "b": y + shared + 0.1 * rng.normal(size=5000),
        "c": y + rng.normal(size=5000),
    }
    corr = error_correlation(y, predictions)
    assert list(corr.columns) == ["a", "b", "c"]
    assert np.allclose(np.diag(corr), 1.0)
    assert corr.loc["a", "b"] > 0.98
    assert abs(corr.loc["a", "c"]) < 0.05
    assert mean_pairwise(corr) == pytest.approx(
        (corr.loc["a", "b"] + corr.loc["a", "c"] + corr.loc["b", "c"]) / 3
    )
    frame = as_plot_frame(corr)
    assert frame.columns[0] == "member" and frame["member"].tolist() == ["a", "b", "c"]
    assert "0.99" in format_table(corr) or "1.00" in format_table(corr)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="no member"):
        error_correlation(np.zeros(3), {})
    with pytest.raises(ValueError, match="a:"):
        error_correlation(np.zeros(3), {"a": np.zeros(4)})
    assert np.isnan(mean_pairwise(error_correlation(np.zeros(3), {"a": np.arange(3.0)})))
