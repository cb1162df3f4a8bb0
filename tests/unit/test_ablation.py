"""The ablation table: members alone, the blend without each, and the fusion head's modalities;
read back by `pricefuse evaluate` from the stage's metrics file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from test_train_fusion import CFG, synthetic

from pricefuse.models.ablation import fusion_modality_table, member_table
from pricefuse.reports import ablation_key, ablation_report


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
