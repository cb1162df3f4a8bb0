"""The member registry: one place names every member, its producer, and how serving calls it."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pricefuse.core.errors import StageError
from pricefuse.core.layout import FOLD, ID, Layout
from pricefuse.models.predictors import PREDICTORS, predictor_class
from pricefuse.pipeline.members import (
    PRODUCERS,
    MemberBatch,
    UnknownMemberError,
    producer_of,
    selected_members,
    serving_producers,
)
from pricefuse.pipeline.predictions import member_predictions
from tests.support import project_params


def test_every_default_member_has_a_producer_with_the_serving_interface() -> None:
    params = project_params()
    for member in selected_members(params):
        producer = producer_of(member, params)
        cls = predictor_class(producer.name)
        assert callable(cls.load) and callable(cls.predict_members)
        if producer.feeds_features:
            assert callable(cls.augment)
    stages = {p.stage for p in PRODUCERS}
    cli = importlib.import_module("pricefuse.cli")
    assert stages <= set(cli.STAGES)


def test_every_producer_and_only_those_has_a_predictor_class() -> None:
    assert set(PREDICTORS) == {p.name for p in PRODUCERS}
    with pytest.raises(KeyError, match="known"):
        predictor_class("nope")


def test_unknown_or_repeated_members_fail_with_the_known_names() -> None:
    with pytest.raises(UnknownMemberError, match="lightgbm"):
        selected_members(project_params(ensemble={"members": ["fusion", "nope"]}))
    with pytest.raises(UnknownMemberError, match="more than once"):
        selected_members(project_params(ensemble={"members": ["linear", "linear"]}))


def test_serving_loads_feature_providers_first_and_only_what_is_needed() -> None:
    only_linear = project_params(ensemble={"members": ["linear"]})
    assert [p.name for p in serving_producers(only_linear)] == ["neighbours", "linear"]
    no_features = project_params(
        ensemble={"members": ["linear"]}, neighbours={"as_features": False}
    )
    assert [p.name for p in serving_producers(no_features)] == ["linear"]
    assert serving_producers(project_params())[0].name == "neighbours"


def test_member_predictions_read_each_members_producer_file(tmp_path: Path) -> None:
    params = project_params(
        data={"models_dir": str(tmp_path)}, ensemble={"members": ["linear", "xgboost"]}
    )
    layout = Layout(params.data)
    ids = pd.Series([3, 1, 2])
    for name, columns in (("linear", ["linear"]), ("gbdt", ["lightgbm", "xgboost"])):
        layout.model_dir(name).mkdir(parents=True)
        frame = pd.DataFrame({ID: [1, 2, 3], FOLD: [0, 1, 2]})
        for i, column in enumerate(columns):
            frame[column] = [1.0 + i, 2.0 + i, 3.0 + i]
        frame.to_parquet(layout.oof_predictions(name), index=False)
    out = member_predictions(params, "train", ["linear", "xgboost"], ids)
    np.testing.assert_array_equal(out["linear"], [3.0, 1.0, 2.0])  # aligned to ids
    np.testing.assert_array_equal(out["xgboost"], [4.0, 2.0, 3.0])
    with pytest.raises(StageError, match="train-fusion"):
        member_predictions(params, "train", ["fusion"], ids)
    with pytest.raises(StageError, match="lack a prediction"):
        member_predictions(params, "train", ["linear"], pd.Series([1, 99]))


def test_with_columns_replaces_in_place_appends_new_and_aligns_by_position() -> None:
    parsed = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]}, index=[7, 3])
    batch = MemberBatch(parsed, np.zeros((2, 4)), np.zeros((2, 3)), np.array([True, False]))
    out = batch.with_columns(pd.DataFrame({"b": ["p", "q"], "c": [5.0, 6.0]}, index=[0, 9]))
    assert list(out.parsed.columns) == ["a", "b", "c"]
    assert out.parsed["b"].tolist() == ["p", "q"] and out.parsed["c"].tolist() == [5.0, 6.0]
    assert parsed["b"].tolist() == ["x", "y"]  # the batch it came from is unchanged
    with pytest.raises(ValueError, match="3 rows of columns for 2 parsed rows"):
        batch.with_columns(pd.DataFrame({"c": [1.0, 2.0, 3.0]}))


def test_with_arrays_keeps_numbers_apart_and_joins_them_only_when_the_table_is_read() -> None:
    """Columns added through `with_arrays` stay float64 arrays beside `base` (no join per
    call); `parsed` joins them once, in order; a column replacing a table column or an array
    replaces it, and the batch it came from is unchanged."""
    parsed = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]}, index=[4, 9])
    batch = MemberBatch(parsed, np.zeros((2, 4)), np.zeros((2, 3)), np.array([True, False]))
    assert batch.parsed is parsed  # nothing to join
    out = batch.with_arrays({"nbr_x": np.array([0.5, np.nan]), "member_m": np.array([3, 4])})
    assert list(out.base.columns) == ["a", "b"] and out.arrays["member_m"].dtype == np.float64
    assert out.column_names() == {"a", "b", "nbr_x", "member_m"}
    assert list(out.parsed.columns) == ["a", "b", "nbr_x", "member_m"]
    assert list(out.parsed.index) == [0, 1]
    np.testing.assert_array_equal(out.parsed["nbr_x"].to_numpy(), [0.5, np.nan])
    assert out.parsed is out.parsed  # joined once
    shadow = out.with_arrays({"a": np.array([7.0, 8.0])})
    assert "a" not in shadow.base.columns and shadow.parsed["a"].tolist() == [7.0, 8.0]
    replaced = out.with_columns(pd.DataFrame({"nbr_x": [7.0, 8.0], "c": [1, 2]}))
    assert set(replaced.arrays) == {"member_m"}
    assert list(replaced.parsed.columns) == ["a", "b", "nbr_x", "c", "member_m"]
    assert batch.arrays == {} and list(parsed.columns) == ["a", "b"]
    with pytest.raises(ValueError, match="arrays of 2 values"):
        batch.with_arrays({"c": np.zeros(3)})
