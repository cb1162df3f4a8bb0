"""The ablation table: members alone, the blend without each, and the fusion head's modalities;
read back by `pricefuse evaluate` from the stage's metrics file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_train_fusion import CFG, synthetic

from pricefuse.analysis.reports import ablation_report
from pricefuse.core.errors import StageError
from pricefuse.models.ensemble.ablation import (
    ablation_key,
    fusion_modality_table,
    member_table,
    run_ablation,
    sample_rows,
)
from tests.support import project_params


def test_member_table_and_report_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(3, 1, 400)
    x = np.column_stack([y + rng.normal(0, 0.1, 400), y + rng.normal(0, 1.0, 400)])
    table = member_table(x, ["good", "noisy"], y)
    rows = {(g, n): v for g, n, v in table.itertuples(index=False, name=None)}
    assert rows[("blend without", "good")] > rows[("blend without", "noisy")]
    assert rows[("blend", "all members")] <= rows[("member alone", "good")] + 1e-9
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps({ablation_key(g, n): v for (g, n), v in rows.items()}))
    report = ablation_report(path)
    assert report is not None and len(report) == len(table)
    back = {(g, n): v for g, n, v in report.itertuples(index=False, name=None)}
    assert back == rows
    assert ablation_report(tmp_path / "absent.json") is None


def test_fusion_modality_rows_use_the_same_folds() -> None:
    train = synthetic(100, seed=3)
    cfg = dataclasses.replace(CFG, epochs=2)
    table = fusion_modality_table(train, cfg, seed=0, variants=["text", "all"])
    assert list(table["name"]) == ["text only", "all"]
    assert np.isfinite(table["smape_oof"]).all()
    assert table["smape_oof"].nunique() == 2  # the variants really differ


def test_core_returns_table_metrics_and_bar_plot(tmp_path: Path) -> None:
    """The stage's core, without MLflow: one metric per table row (the keys metrics/ablation.json
    and `pricefuse evaluate` use), the table, and the bar plot dvc.yaml declares."""
    train = synthetic(100, seed=3)
    rng = np.random.default_rng(1)
    oof = np.column_stack([train.target + rng.normal(0, s, len(train)) for s in (0.1, 0.5)])
    cfg = dataclasses.replace(CFG, epochs=2)

    record = run_ablation(cfg, 0, ["tabular", "all"], train, oof, ["good", "noisy"])

    table = record.tables["ablation_table.json"]
    assert list(table.columns) == ["group", "name", "smape_oof"]
    assert list(table["name"])[-2:] == ["tabular only", "all"]
    assert record.metrics == {
        ablation_key(g, n): v for g, n, v in table.itertuples(index=False, name=None)
    }
    assert {"member_alone/good", "blend_without/noisy", "fusion_head/all"} <= set(record.metrics)
    assert table.to_string(index=False) in record.summary
    [plot] = record.plots
    record.write_plots("ablation", tmp_path)
    bars = pd.read_csv(tmp_path / "ablation" / f"{plot.name}.csv")
    assert plot.name == "ablation" and list(bars.columns) == ["label", "value"]
    assert bars["label"].tolist()[-1] == "fusion head: all"
    np.testing.assert_allclose(bars["value"], table["smape_oof"], rtol=1e-5)


def test_unknown_variants_and_members_are_stage_errors() -> None:
    train = synthetic(40, seed=3)
    oof = train.target[:, None]
    with pytest.raises(StageError, match=r"ablation.fusion_variants: unknown \['sound'\]"):
        run_ablation(CFG, 0, ["text", "sound"], train, oof, ["good"])

    from pricefuse.stages import ablation

    with pytest.raises(StageError, match=r"ensemble\.members: .*nope"):
        ablation.run(project_params(ensemble={"members": ["fusion", "nope"]}))


def test_max_rows_bounds_the_head_variants_but_not_the_member_rows() -> None:
    """At scale the head variants train on a sample of `ablation.max_rows` rows (each keeping its
    fold); the member table still reads every row, and a sample as large as the data is the data."""
    train = synthetic(120, seed=3)
    sample = sample_rows(train, 50, seed=0)
    assert (
        len(sample) == 50
        and sample_rows(train, 0, 0) is train
        and sample_rows(train, 120, 0) is train
    )
    rows = train.frame.reset_index().merge(sample.frame, on=list(sample.frame.columns))["index"]
    assert len(rows) == 50 and rows.is_monotonic_increasing  # real rows, original order, folds kept
    np.testing.assert_array_equal(sample.text, train.text[rows.to_numpy()])
    with pytest.raises(StageError, match=r"ablation\.max_rows"):
        sample_rows(train, -1, 0)

    rng = np.random.default_rng(1)
    oof = np.column_stack([train.target + rng.normal(0, s, len(train)) for s in (0.1, 0.5)])
    cfg = dataclasses.replace(CFG, epochs=2)
    bounded = run_ablation(cfg, 0, ["tabular"], train, oof, ["good", "noisy"], max_rows=50)
    full = run_ablation(cfg, 0, ["tabular"], train, oof, ["good", "noisy"])
    assert bounded.params["fusion_rows"] == 50 and full.params["fusion_rows"] == 120
    assert "on 50 of 120 rows" in bounded.summary
    members = [k for k in full.metrics if not k.startswith("fusion_head/")]
    assert {k: bounded.metrics[k] for k in members} == {k: full.metrics[k] for k in members}
    assert bounded.metrics["fusion_head/tabular_only"] != full.metrics["fusion_head/tabular_only"]
