"""Stage records: plot data DVC can diff, and input digests that match dvc.lock."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from pricefuse.core import records
from pricefuse.core.metrics import smape
from pricefuse.recording.datasets import content_md5, input_digest, lock_digests


def test_smape_by_decile_scores_each_price_decile_separately():
    prices = np.arange(1.0, 101.0)
    y_log = np.log1p(prices)
    perfect_cheap = prices.copy()
    perfect_cheap[prices > 50] *= 2  # only the expensive half is wrong
    table = records.smape_by_decile(y_log, {"model": np.log1p(perfect_cheap)})
    assert table["decile"].tolist() == list(range(1, 11))
    assert table.loc[table["decile"] <= 5, "model"].max() == pytest.approx(0.0, abs=1e-9)
    expected = smape(prices[prices > 90], 2 * prices[prices > 90])
    assert table.loc[table["decile"] == 10, "model"].item() == pytest.approx(expected)
    assert table["price_high"].is_monotonic_increasing


def test_mean_curves_average_the_folds_that_reached_each_epoch():
    histories = {
        "fold_0": {"val_smape": [50.0, 40.0, 30.0], "train_loss": [1.0, 0.5, 0.25]},
        "fold_1": {"val_smape": [60.0, 50.0], "train_loss": [2.0, 1.0]},
    }
    frame = records.mean_curves(histories)
    assert frame["epoch"].tolist() == [1, 2, 3]
    assert frame["val_smape"].tolist() == [55.0, 45.0, 30.0]
    assert frame["train_loss"].tolist() == [1.5, 0.75, 0.25]


def test_write_plots_writes_csv_and_png_and_drops_stale_files(tmp_path):
    y = np.log1p(np.linspace(1, 500, 5000))
    record = records.StageRecord(
        summary="",
        plots=[
            records.pred_vs_actual("pred_vs_actual", y, y + 0.1, "t"),
            records.decile_plot("smape_by_decile", y, {"m": y}, "t"),
            records.bars("members", ["a", "b"], [1.0, 2.0], "t"),
        ],
    )
    stale = tmp_path / "demo" / "old_booster.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("x\n1\n")
    written = record.write_plots("demo", tmp_path)
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{ext}"
        for n in ("pred_vs_actual", "smape_by_decile", "members")
        for ext in ("csv", "png")
    )
    assert not stale.exists()
    scatter = pd.read_csv(tmp_path / "demo" / "pred_vs_actual.csv")
    assert list(scatter.columns) == ["actual", "predicted"]
    assert len(scatter) == records.SCATTER_SAMPLE  # sampled for DVC; the PNG draws all rows
    assert list(pd.read_csv(tmp_path / "demo" / "members.csv").columns) == ["label", "value"]


def test_input_digest_is_dvc_lock_hash_when_recorded_else_content_md5(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n")
    folder = tmp_path / "interim"
    folder.mkdir()
    (folder / "x.parquet").write_bytes(b"123")
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "preprocess": {
                        "deps": [{"path": "data/raw/train.csv", "md5": "aaa", "size": 1}],
                        "outs": [{"path": "data/interim", "md5": "bbb.dir", "size": 3}],
                    }
                },
            }
        )
    )
    digests = lock_digests(lock)
    assert digests == {"data/raw/train.csv": "aaa", "data/interim": "bbb.dir"}
    assert input_digest("data/interim", digests) == "bbb.dir"
    # Not in dvc.lock: a file's md5 is what DVC would record for it.
    import hashlib

    assert input_digest(data, digests) == hashlib.md5(data.read_bytes()).hexdigest()
    before = content_md5(folder)
    (folder / "x.parquet").write_bytes(b"1234")
    assert content_md5(folder) != before
    assert lock_digests(tmp_path / "absent.lock") == {}


def test_record_logs_everything_a_stage_returns(tmp_path, monkeypatch):
    import mlflow

    from pricefuse.recording import tracking
    from tests.support import project_params

    monkeypatch.chdir(tmp_path)
    for name in ("train.csv", "test.csv"):
        (tmp_path / name).write_text("sample_id,catalog_content\n1,a\n")
    params = project_params(data={"train_csv": "train.csv", "test_csv": "test.csv"})
    out_dir = tmp_path / "model"
    (tmp_path / "model_file.txt").write_text("weights")
    y = np.log1p(np.arange(1.0, 41.0))
    result = records.StageRecord(
        summary="done: 1.0",
        metrics={"smape_oof": 1.0},
        step_metrics={"val_smape_fold_0": [3.0, 2.0, 1.0]},
        plots=[records.decile_plot("smape_by_decile", y, {"m": y}, "t")],
        artifacts={"model": [tmp_path / "model_file.txt"]},
        meta={out_dir: {"smape_oof": 1.0}},
        tags={"method": "blend"},
    )
    with tracking.stage_run("demo_stage", params, inputs=[tmp_path / "model_file.txt"]) as run:
        mlflow.log_metric("system/cpu_utilization_percentage", 50.0)  # as the sampler logs it
        tracking.record(run, "demo_stage", result)
    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.metrics["smape_oof"] == 1.0
    assert logged.data.tags["method"] == "blend"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_smape_fold_0")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    names = {d.dataset.name for d in logged.inputs.dataset_inputs}
    assert {"train.csv", "test.csv"} <= names and any("model_file.txt" in n for n in names)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/smape_by_decile.csv", "plots/smape_by_decile.png"}
    assert (tmp_path / "plots/demo_stage/smape_by_decile.csv").is_file()
    assert tracking.read_meta(out_dir)["run_id"] == run.info.run_id
    mirrored = json.loads((tmp_path / "metrics/demo_stage.json").read_text())
    assert mirrored["smape_oof"] == 1.0
    assert not any(key.startswith("system/") for key in mirrored)  # they differ on every run
