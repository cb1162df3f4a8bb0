"""benchmarks/text_signal.py's heads on a block are out of fold, and its member and leave-out
tables read a project's prediction files as the ensemble stage would. (The benchmark itself
encodes thousands of rows with an LLM: far too slow for a test; its figures are in
docs/results.md.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from benchmarks import text_signal

from pricefuse.core.metrics import smape_from_log


def test_heads_never_read_the_held_fold_prices() -> None:
    """Changing the prices of fold 0 leaves fold 0's predictions unchanged and moves the others'
    (so the check can fail)."""
    rng = np.random.default_rng(0)
    block = rng.normal(size=(200, 16)).astype(np.float32)
    y = block[:, 0] * 0.5 + 3.0 + rng.normal(scale=0.1, size=200)
    folds = np.arange(200) % 4
    changed = y.copy()
    changed[folds == 0] += 2.0
    before = text_signal.oof_heads(block, y, folds, seed=0)
    after = text_signal.oof_heads(block, changed, folds, seed=0)
    for name in ("ridge", "mlp", "knn"):
        np.testing.assert_allclose(after[name][folds == 0], before[name][folds == 0], rtol=1e-6)
        assert not np.allclose(after[name][folds == 1], before[name][folds == 1])
    # the ridge finds the signal: far better than the median
    assert smape_from_log(y, before["ridge"]) < smape_from_log(y, np.full(200, np.median(y)))


def _project(root: Path) -> Path:
    rng = np.random.default_rng(1)
    n = 120
    y = rng.normal(3.0, 1.0, size=n)
    ids = np.arange(n)
    (root / "data/interim").mkdir(parents=True)
    (root / "data/features").mkdir(parents=True)
    (root / "metrics").mkdir()
    parsed = pd.DataFrame(
        {
            "sample_id": ids,
            "log_price": y,
            "fold": ids % 3,
            "text_len": 100.0,
            "quantity_kind": "mass",
        }
    )
    parsed.to_parquet(root / "data/interim/train.parquet")
    np.save(root / "data/features/train_image_mask.npy", np.zeros(n, dtype=bool))
    for producer, members in {"gbdt": ("lightgbm", "lightgbm_unit", "lightgbm_own")}.items():
        frame = pd.DataFrame({"sample_id": ids[::-1], "fold": (ids % 3)[::-1]})
        for i, member in enumerate(members):
            frame[member] = (y + rng.normal(scale=0.3 + 0.1 * i, size=n))[::-1]
        (root / "data/models" / producer).mkdir(parents=True)
        frame.to_parquet(root / "data/models" / producer / "oof.parquet")
    (root / "metrics/ensemble.json").write_text('{"smape_oof": 10.0}')
    params = {
        "data": {"features_dir": "data/features"},
        "ensemble": {"stackers": ["ridge"], "stack_alpha": 1.0},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_members_are_aligned_by_id_and_the_leave_out_table_covers_the_new_members(tmp_path):
    project = _project(tmp_path)
    train, oof = text_signal.load_members(project)
    assert list(oof.columns) == ["lightgbm", "lightgbm_unit", "lightgbm_own"]
    # the files were written in reverse order: aligned by sample_id, the errors stay small
    assert smape_from_log(train["log_price"].to_numpy(), oof["lightgbm"].to_numpy()) < 40
    table = text_signal.member_table(project, train, oof)
    assert table["columns"][-3:] == [
        "ensemble",
        "gain over best member",
        "ensemble before (48a80cb)",
    ]
    left_out = text_signal.leave_out_table(project, train, oof, seed=0)
    labels = [row[0] for row in left_out["rows"]]
    assert labels == [
        "every member",
        "without lightgbm_unit",
        "without lightgbm_own",
        "without lightgbm_unit and lightgbm_own",
    ]
    assert all(0 < row[1] < 200 for row in left_out["rows"])
