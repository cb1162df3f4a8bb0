"""The train_gbdt stage on tiny synthetic inputs: the core's record without MLflow, files written,
MLflow run logged, errors clear."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from test_tabular import embeddings, parsed_frame

from pricefuse.core.config import Params
from pricefuse.core.device import device_tags, resolve_device
from pricefuse.core.errors import StageError
from pricefuse.core.layout import Layout
from pricefuse.core.metrics import smape_from_log
from pricefuse.core.rows import row_hash
from pricefuse.models.gbdt.member import train_gbdt_members
from pricefuse.models.gbdt.predictor import GbdtPredictor
from pricefuse.pipeline.members import MemberBatch
from pricefuse.recording import tracking
from pricefuse.stages import train_gbdt
from tests.support import project_params

# The members: gbdt.boosters, then the per-unit member of gbdt.unit_price_boosters and the
# own-view member of gbdt.own_view_boosters (params.yaml).
BOOSTERS = ["lightgbm", "xgboost", "catboost", "lightgbm_unit", "lightgbm_own"]


def write_inputs(layout: Layout, n_train: int = 150, n_test: int = 20) -> None:
    """What preprocess and embed leave behind, including embed's meta with row hashes."""
    layout.interim_dir.mkdir(parents=True)
    layout.features_dir.mkdir(parents=True)
    hashes = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        frame = parsed_frame(n, seed)
        if split == "test":
            frame = frame.drop(columns=["log_price"]).assign(fold=-1, sample_id=np.arange(n))
        frame.to_parquet(layout.parsed(split), index=False)
        hashes[f"row_hash_{split}"] = row_hash(frame["sample_id"].tolist())
        emb = embeddings(n, seed)
        np.save(layout.text_embeddings(split), emb.text)
        np.save(layout.image_embeddings(split), emb.image)
        np.save(layout.image_mask(split), emb.image_mask)
    tracking.write_meta(layout.features_dir, "embed", "embed-run-id", **hashes)


@pytest.fixture
def params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Params:
    monkeypatch.chdir(tmp_path)
    gbdt = {"n_estimators": 40, "learning_rate": 0.2, "early_stopping_rounds": 10}
    params = project_params(
        gbdt={**gbdt, "text_pca": 3, "image_pca": 2, "max_bin": 63, "stack_members": []},
        neighbours={"as_features": False},
    )
    write_inputs(Layout(params.data))
    return params


def test_stage_writes_predictions_models_and_logs_the_run(params: Params) -> None:
    layout = Layout(params.data)
    train_gbdt.run(params)

    train = pd.read_parquet(layout.parsed("train"))
    oof = pd.read_parquet(layout.oof_predictions("gbdt"))
    test = pd.read_parquet(layout.test_predictions("gbdt"))
    assert list(oof.columns) == ["sample_id", "fold", *BOOSTERS]
    assert list(test.columns) == ["sample_id", *BOOSTERS]
    np.testing.assert_array_equal(oof["sample_id"], train["sample_id"])
    np.testing.assert_array_equal(oof["fold"], train["fold"])
    assert len(test) == 20 and np.isfinite(oof[BOOSTERS].to_numpy()).all()

    # The saved model is what serving loads; it must reproduce the stage's test predictions.
    parsed_test = pd.read_parquet(layout.parsed("test"))
    arrays = [np.load(p("test")) for p in (layout.text_embeddings, layout.image_embeddings)]
    served = GbdtPredictor.load(layout.model_dir("gbdt")).predict(
        parsed_test, *arrays, np.load(layout.image_mask("test"))
    )
    for name in BOOSTERS:
        np.testing.assert_allclose(served[name], test[name])

    meta = json.loads((layout.model_dir("gbdt") / "meta.json").read_text())
    run = mlflow.get_run(meta["run_id"])
    metrics = run.data.metrics
    y = train["log_price"].to_numpy()
    baseline = smape_from_log(y, np.full(len(y), np.median(y)))
    for name in BOOSTERS:
        assert metrics[f"smape_oof_{name}"] == pytest.approx(smape_from_log(y, oof[name]))
        assert metrics[f"smape_oof_{name}"] < 0.5 * baseline
        assert {f"smape_fold_{k}_{name}" for k in range(5)} <= set(metrics)
    assert run.data.tags["stage"] == "train_gbdt"
    assert run.data.tags["upstream.embed"] == "embed-run-id"
    # where it trained (gbdt.device: auto -> cpu here, cuda on a GPU machine)
    assert {k: run.data.tags[k] for k in ("device", "gpu_name", "gpu_count")} == device_tags(
        resolve_device(params.gbdt.device)
    )
    client = mlflow.MlflowClient()
    model_files = {f.path for f in client.list_artifacts(run.info.run_id, "gbdt_model")}
    assert {"gbdt_model/gbdt.json", "gbdt_model/featurizer_0"} <= model_files
    assert {f"gbdt_model/{b}" for b in BOOSTERS} <= model_files
    plots = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {f"importance_{b}.png" for b in BOOSTERS} <= plots
    assert {f"pred_vs_actual_{b}.csv" for b in BOOSTERS} | {"smape_by_decile.csv"} <= plots
    assert (Path("plots/train_gbdt") / "smape_by_decile.csv").is_file()
    native = mlflow.lightgbm.load_model(f"runs:/{run.info.run_id}/lightgbm_fold0")
    assert native.num_feature() == len(
        json.loads((layout.model_dir("gbdt") / "gbdt.json").read_text())["feature_names"]
    )


def batch(n: int, seed: int) -> MemberBatch:
    emb = embeddings(n, seed)
    return MemberBatch(parsed_frame(n, seed), emb.text, emb.image, emb.image_mask)


def declared_plots(stage: str) -> set[str]:
    """The plot files dvc.yaml declares for a stage (top-level `plots:` under plots/<stage>/)."""
    text = (Path(__file__).parents[2] / "dvc.yaml").read_text()
    return {Path(p).name for p in re.findall(rf"^\s*- (plots/{stage}/\S+\.csv):", text, re.M)}


def test_core_returns_what_the_stage_records_without_mlflow(params: Params, tmp_path: Path) -> None:
    layout = Layout(params.data)
    train, test = batch(150, 0), batch(20, 1)
    record = train_gbdt_members(params.gbdt, params.seed, train, test, layout)

    assert not (tmp_path / "mlflow.db").exists() and mlflow.active_run() is None
    n_features = len(
        json.loads((layout.model_dir("gbdt") / "gbdt.json").read_text())["feature_names"]
    )
    per_booster = {f"{m}_{b}" for b in BOOSTERS for m in ("smape_oof", "best_iteration")} | {
        f"smape_fold_{k}_{b}" for b in BOOSTERS for k in range(5)
    }
    assert set(record.metrics) == {"n_features", "smape_oof", *per_booster}
    assert record.metrics["n_features"] == n_features
    oof = pd.read_parquet(layout.oof_predictions("gbdt"))
    y = train.parsed["log_price"].to_numpy()
    assert record.metrics["smape_oof_xgboost"] == pytest.approx(smape_from_log(y, oof["xgboost"]))
    assert record.summary.startswith("OOF SMAPE (%): lightgbm ")

    written = {p.name for p in record.write_plots("train_gbdt", tmp_path / "plots")}
    csvs = {name for name in written if name.endswith(".csv")}
    assert csvs == declared_plots("train_gbdt")
    assert {name.replace(".csv", ".png") for name in csvs} <= written
    deciles = pd.read_csv(tmp_path / "plots/train_gbdt/smape_by_decile.csv")
    assert list(deciles.columns) == ["decile", "price_low", "price_high", *BOOSTERS]
    importance = pd.read_csv(tmp_path / "plots/train_gbdt/importance_catboost.csv")
    assert list(importance.columns) == ["label", "value"] and len(importance) == 25
    assert importance["value"].is_monotonic_decreasing
    scatter = pd.read_csv(tmp_path / "plots/train_gbdt/pred_vs_actual_lightgbm.csv")
    np.testing.assert_allclose(scatter["predicted"], np.expm1(oof["lightgbm"]), rtol=1e-5)

    out_dir = layout.model_dir("gbdt")
    assert record.artifacts == {"gbdt_model": [out_dir]}
    facts = record.meta[out_dir]
    assert facts["boosters"] == BOOSTERS and facts["n_folds"] == 5
    assert facts["n_features"] == n_features and set(facts["smape_oof"]) == set(BOOSTERS)
    assert {name: m.flavor for name, m in record.models.items()} == {
        f"{b}_fold0": f"mlflow.{b.removesuffix('_unit').removesuffix('_own')}" for b in BOOSTERS
    }


def test_unknown_booster_is_a_stage_error_naming_the_parameter(params: Params) -> None:
    cfg = dataclasses.replace(params.gbdt, boosters=("lightgbm", "randomforest"))
    with pytest.raises(StageError, match=r"gbdt\.boosters: unknown booster 'randomforest'"):
        train_gbdt_members(cfg, 0, batch(30, 0), batch(5, 1), Layout(params.data))


def test_misaligned_embeddings_stop_the_stage_with_a_clear_error(params: Params) -> None:
    layout = Layout(params.data)
    np.save(layout.text_embeddings("train"), np.zeros((7, 4), dtype=np.float32))
    with pytest.raises(StageError, match="embedding rows"):
        train_gbdt.run(params)


def test_embeddings_of_other_rows_are_refused(params: Params) -> None:
    layout = Layout(params.data)
    tracking.write_meta(layout.features_dir, "embed", "x", row_hash_train=row_hash([1, 2]))
    with pytest.raises(StageError, match="row hash differs"):
        train_gbdt.run(params)


def test_missing_inputs_name_the_stage_to_run(params: Params) -> None:
    Layout(params.data).image_mask("test").unlink()
    with pytest.raises(StageError, match="run preprocess and embed"):
        train_gbdt.run(params)
