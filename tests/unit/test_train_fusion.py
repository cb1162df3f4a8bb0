"""Fusion training on a synthetic, learnable price problem: inputs, K-fold training, the saved
predictor and the `train_fusion` stage end to end (tmp dir, sqlite MLflow store)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pricefuse.core.layout import Layout
from pricefuse.core.metrics import smape_from_log
from pricefuse.models.fusion.inputs import UNK, InputSpec, SplitData
from pricefuse.models.fusion.member import MODEL_ARTIFACT_PATH, train_fusion_member
from pricefuse.models.fusion.predictor import MANIFEST, FusionPredictor
from pricefuse.models.fusion.training import KFoldResult, train_fold, train_kfold
from tests.support import project_params

UNIT_EFFECT = {"ounce": 0.0, "count": 0.5, "fl_oz": -0.4, "gram": 0.3, "none": -0.6}
TEXT_DIM, IMAGE_DIM, N_FOLDS = 16, 8, 4
# The plots dvc.yaml declares for train_fusion, with the columns its plot definitions read.
FUSION_PLOTS = {
    "pred_vs_actual": ["actual", "predicted"],
    "smape_by_decile": ["decile", "price_low", "price_high", "fusion"],
    "learning_curves": ["epoch", "train_loss", "val_smape"],
}
# Every modality: the synthetic prices depend on the embeddings (params.yaml's default head
# sees tabular inputs only; see the comment there). A smaller gated_residual head, for the tests
# (and benchmarks/train_fusion.py) that choose it.
_FUSION = project_params().fusion
CFG = dataclasses.replace(
    _FUSION,
    lr=3e-3,
    epochs=30,
    batch_size=64,
    unit_dim=8,
    patience=6,
    modalities=("text", "image", "tabular"),
    heads=dataclasses.replace(
        _FUSION.heads,
        gated_residual=dataclasses.replace(
            _FUSION.heads.gated_residual, hidden=32, n_blocks=1, dropout=0.1
        ),
    ),
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(n: int, seed: int, with_target: bool = True) -> SplitData:
    """log price = text latent + unit effect + quantity/pack + (image latent if any) + noise.

    Text and image vectors are noisy random projections of their latents; rows without an image
    carry random garbage in the image array, which the model must ignore.
    """
    rng = np.random.default_rng(seed)
    z_text = rng.normal(size=(n, 3))
    z_image = rng.normal(size=(n, 1))
    units = np.array(list(UNIT_EFFECT))[rng.integers(0, len(UNIT_EFFECT), n)]
    log_quantity = rng.normal(3.0, 1.0, n)
    pack = rng.choice([1, 2, 6], n)
    has_image = rng.random(n) < 0.6
    log_price = (
        2.8
        + 0.7 * z_text[:, 0]
        - 0.4 * z_text[:, 1] * z_text[:, 2]
        + np.array([UNIT_EFFECT[u] for u in units])
        + 0.3 * (log_quantity - 3.0)
        + 0.4 * np.log(pack)
        + np.where(has_image, 0.5 * z_image[:, 0], 0.0)
        + rng.normal(0.0, 0.1, n)
    )
    mix = np.random.default_rng(12345)  # same projections for every split
    text = z_text @ mix.normal(size=(3, TEXT_DIM)) + 0.05 * rng.normal(size=(n, TEXT_DIM))
    image = z_image @ mix.normal(size=(1, IMAGE_DIM)) + 0.05 * rng.normal(size=(n, IMAGE_DIM))
    image[~has_image] = rng.normal(size=(int((~has_image).sum()), IMAGE_DIM)) * 10.0
    frame = pd.DataFrame(
        {
            "sample_id": np.arange(n) + 1000 * seed,
            "unit": units,
            "pack": pack,
            "value": np.exp(log_quantity) * pack,
            "log_quantity": log_quantity,
            "value_missing": False,
            "unit_missing": units == "none",
            "n_bullets": rng.integers(0, 6, n),
            "text_len": rng.integers(50, 2000, n),
            "has_image": has_image,
            "fold": rng.integers(0, N_FOLDS, n) if with_target else -1,
        }
    )
    if with_target:
        frame["log_price"] = np.clip(log_price, 0.1, None)
        # A unit that occurs only in fold 0: the fold-0 model must treat it as unknown.
        only_fold0 = np.flatnonzero(frame["fold"].to_numpy() == 0)[:4]
        frame.loc[only_fold0, "unit"] = "gallon"
    return SplitData(frame, text.astype(np.float32), image.astype(np.float32), has_image)


@pytest.fixture(scope="module")
def trained() -> tuple[SplitData, SplitData, KFoldResult]:
    torch.set_num_threads(1)
    train, test = synthetic(600, seed=1), synthetic(150, seed=2, with_target=False)
    return train, test, train_kfold(train, CFG, seed=7, test=test)


def test_training_beats_the_median_baseline_by_far(trained) -> None:
    train, _, result = trained
    y = train.target
    baseline = smape_from_log(y, np.full_like(y, np.median(y)))
    assert result.smape_oof < 0.5 * baseline, (result.smape_oof, baseline)
    assert len(result.fold_smape) == N_FOLDS
    assert result.seconds > 0  # its speed: python benchmarks/train_fusion.py
    for history in result.histories.values():
        assert 1 <= history.best_epoch <= len(history.val_smape) <= CFG.epochs
        assert len(history.train_loss) == len(history.val_smape)
        assert history.train_loss[-1] < history.train_loss[0]


def test_oof_rows_come_from_the_model_that_did_not_see_them(trained) -> None:
    train, test, result = trained
    assert np.isfinite(result.oof).all()
    for k, fold in enumerate(result.predictor.folds):
        rows = np.flatnonzero(result.folds == k)
        np.testing.assert_array_equal(result.oof[rows], fold.predict(train.take(rows)))
    assert result.test is not None
    expected = np.mean([fold.predict(test) for fold in result.predictor.folds], axis=0)
    np.testing.assert_allclose(result.test, expected, rtol=0, atol=1e-12)


def test_unit_vocabulary_is_fit_on_the_fold_training_rows_only(trained) -> None:
    _, _, result = trained
    assert "gallon" not in result.predictor.folds[0].spec.units
    assert all("gallon" in fold.spec.units for fold in result.predictor.folds[1:])


def test_unknown_and_missing_units_map_to_unk(trained) -> None:
    _, test, result = trained
    spec = result.predictor.folds[0].spec
    index = spec.unit_index(["ounce", "furlong", None, UNK, float("nan")])
    assert index[0] > 0 and list(index[1:]) == [0, 0, 0, 0]

    def predict_with_unit(unit: str | None) -> np.ndarray:
        frame = test.frame.assign(unit=unit)
        return result.predictor.predict(frame, test.text, test.image, test.image_mask)

    unknown = predict_with_unit("furlong")
    assert np.isfinite(unknown).all()
    np.testing.assert_array_equal(unknown, predict_with_unit(None))
    assert not np.array_equal(unknown, predict_with_unit("count"))


def test_predictions_stay_in_the_training_price_range(trained) -> None:
    train, test, result = trained
    wild = result.predictor.predict(test.frame, test.text * 1e3, test.image, test.image_mask)
    y = train.target
    assert wild.min() >= y.min() - 1e-9 and wild.max() <= y.max() + 1e-9


def test_save_load_roundtrip_predicts_identically(trained, tmp_path: Path) -> None:
    _, test, result = trained
    result.predictor.save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [f["weights"] for f in manifest["folds"]] == [f"fold_{k}.pt" for k in range(N_FOLDS)]
    loaded = FusionPredictor.load(tmp_path)
    args = (test.frame, test.text, test.image, test.image_mask)
    np.testing.assert_array_equal(loaded.predict(*args), result.predictor.predict(*args))


def test_predictor_shares_the_numeric_matrix_yet_predicts_as_each_fold_alone(trained) -> None:
    """FusionPredictor builds the raw numeric features once for all folds (serving latency);
    the mean of each fold model predicting on its own is the same, bit for bit, and a fold
    model left in training mode is put in eval mode for the prediction and restored."""
    _, test, result = trained
    predictor = result.predictor
    alone = np.mean([fold.predict(test) for fold in predictor.folds], axis=0)
    args = (test.frame, test.text, test.image, test.image_mask)
    np.testing.assert_array_equal(predictor.predict(*args), alone)
    head = predictor.folds[0].head
    head.train()
    try:
        np.testing.assert_array_equal(predictor.predict(*args), alone)
        assert head.training
    finally:
        head.eval()


def test_training_is_deterministic_given_the_seed() -> None:
    data = synthetic(200, seed=3)
    cfg = dataclasses.replace(CFG, epochs=3)
    first = train_kfold(data, cfg, seed=11).oof
    np.testing.assert_array_equal(first, train_kfold(data, cfg, seed=11).oof)
    assert not np.array_equal(first, train_kfold(data, cfg, seed=12).oof)


def test_split_data_rejects_inconsistent_inputs() -> None:
    data = synthetic(20, seed=4)
    with pytest.raises(ValueError, match="row"):
        SplitData(data.frame, data.text[:-1], data.image, data.image_mask)
    text = data.text.copy()
    text[0, 0] = np.nan
    with pytest.raises(ValueError, match="text embeddings"):
        SplitData(data.frame, text, data.image, data.image_mask)
    with pytest.raises(ValueError, match="dims"):
        InputSpec.fit(data).build(
            SplitData(data.frame, data.text[:, :5], data.image, data.image_mask)
        )
    # NaN in the image vector of a row without an image is fine: it is never used.
    image = data.image.copy()
    image[~data.image_mask] = np.nan
    SplitData(data.frame, data.text, image, data.image_mask)


def _write_split(layout: Layout, split: str, data: SplitData) -> None:
    layout.parsed(split).parent.mkdir(parents=True, exist_ok=True)
    layout.features_dir.mkdir(parents=True, exist_ok=True)
    data.frame.to_parquet(layout.parsed(split), index=False)
    np.save(layout.text_embeddings(split), data.text)
    np.save(layout.image_embeddings(split), data.image)
    np.save(layout.image_mask(split), data.image_mask)


def test_stage_writes_outputs_and_logs_the_run(tmp_path: Path, monkeypatch) -> None:
    from pricefuse.stages import train_fusion

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    fusion = dataclasses.asdict(dataclasses.replace(CFG, epochs=4))
    params = project_params(
        seed=5,
        fusion={**fusion, "stack_members": []},
        mlflow={"experiment": "t"},
        neighbours={"as_features": False},
    )
    layout = Layout(params.data)
    train, test = synthetic(160, seed=5), synthetic(40, seed=6, with_target=False)
    _write_split(layout, "train", train)
    _write_split(layout, "test", test)

    train_fusion.run(params)

    oof = pd.read_parquet(layout.oof_predictions("fusion"))
    assert list(oof.columns) == ["sample_id", "fold", "fusion"]
    assert oof["sample_id"].tolist() == train.frame["sample_id"].tolist()
    assert oof["fold"].tolist() == train.frame["fold"].tolist()
    test_pred = pd.read_parquet(layout.test_predictions("fusion"))
    assert list(test_pred.columns) == ["sample_id", "fusion"]
    assert len(test_pred) == len(test) and np.isfinite(test_pred["fusion"]).all()
    model_dir = layout.model_dir("fusion")
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["stage"] == "train_fusion"
    assert meta["smape_oof"] == pytest.approx(smape_from_log(train.target, oof["fusion"]))

    client = mlflow.MlflowClient(uri)
    run = client.get_run(meta["run_id"])
    assert run.data.tags["stage"] == "train_fusion"
    assert run.data.metrics["smape_oof"] == pytest.approx(meta["smape_oof"])
    for k in range(N_FOLDS):
        assert f"smape_fold_{k}" in run.data.metrics
        curve = client.get_metric_history(run.info.run_id, f"val_smape_fold_{k}")
        assert sorted(m.step for m in curve) == list(range(1, len(curve) + 1))
        assert len(client.get_metric_history(run.info.run_id, f"train_loss_fold_{k}")) == len(curve)
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    expected = {f"{n}.{ext}" for n in FUSION_PLOTS for ext in ("csv", "png")}
    assert expected == plots
    assert {p.name for p in (tmp_path / "plots" / "train_fusion").iterdir()} == expected

    # The logged model is the whole predictor: it reproduces the stage's test predictions.
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="fusion_model", dst_path=str(tmp_path / "dl")
    )
    logged = FusionPredictor.load(local)
    again = logged.predict(test.frame, test.text, test.image, test.image_mask)
    np.testing.assert_array_equal(again, test_pred["fusion"].to_numpy())


def test_member_core_returns_the_record_without_mlflow(tmp_path: Path) -> None:
    """The stage's core trains, writes the model and predictions, and returns everything the
    stage records; no tracking store is involved."""
    models_dir = tmp_path / "models"
    layout = Layout(project_params(data={"models_dir": str(models_dir)}).data)
    model_dir = layout.model_dir("fusion")
    model_dir.mkdir(parents=True)
    (model_dir / "fold_9.pt").write_bytes(b"from a run with more folds")
    train, test = synthetic(160, seed=5), synthetic(40, seed=6, with_target=False)
    cfg = dataclasses.replace(CFG, epochs=3)

    record = train_fusion_member(cfg, 5, train, test, layout)

    assert not (model_dir / "fold_9.pt").exists()
    folds = [f"fold_{k}" for k in range(N_FOLDS)]
    expected_metrics = {"smape_oof", "train_seconds"}
    expected_metrics |= {f"smape_fold_{k}" for k in range(N_FOLDS)}
    expected_metrics |= {f"best_epoch_{f}" for f in folds}
    assert set(record.metrics) == expected_metrics
    assert set(record.step_metrics) == {
        f"{s}_{f}" for s in ("train_loss", "val_smape") for f in folds
    }
    for fold in folds:
        curve = record.step_metrics[f"val_smape_{fold}"]
        assert 1 <= record.metrics[f"best_epoch_{fold}"] <= len(curve) <= cfg.epochs
        assert len(record.step_metrics[f"train_loss_{fold}"]) == len(curve)
    assert [p.name for p in record.plots] == list(FUSION_PLOTS)
    files = record.artifacts[MODEL_ARTIFACT_PATH]
    assert [f.name for f in files] == [MANIFEST, *(f"{f}.pt" for f in folds)]
    meta = record.meta[model_dir]
    assert meta["smape_oof"] == record.metrics["smape_oof"]
    assert meta["fold_smape"] == [record.metrics[f"smape_fold_{k}"] for k in range(N_FOLDS)]
    assert meta["model_artifact_path"] == MODEL_ARTIFACT_PATH and meta["manifest"] == MANIFEST
    assert "fusion OOF SMAPE" in record.summary

    oof = pd.read_parquet(layout.oof_predictions("fusion"))
    assert record.metrics["smape_oof"] == pytest.approx(smape_from_log(train.target, oof["fusion"]))
    saved = FusionPredictor.load(model_dir)
    test_pred = pd.read_parquet(layout.test_predictions("fusion"))["fusion"].to_numpy()
    np.testing.assert_array_equal(
        test_pred, saved.predict(test.frame, test.text, test.image, test.image_mask)
    )
    assert not list(tmp_path.glob("mlflow.db")) and not (tmp_path / "mlruns").exists()

    written = record.write_plots("train_fusion", tmp_path / "plots")
    assert {p.name for p in written} == {f"{n}.{e}" for n in FUSION_PLOTS for e in ("csv", "png")}
    for name, columns in FUSION_PLOTS.items():
        frame = pd.read_csv(tmp_path / "plots" / "train_fusion" / f"{name}.csv")
        assert list(frame.columns) == columns, name
        assert frame.notna().all().all() and len(frame) > 0
    curves = pd.read_csv(tmp_path / "plots" / "train_fusion" / "learning_curves.csv")
    longest = max(len(c) for c in record.step_metrics.values())
    assert curves["epoch"].tolist() == list(range(1, longest + 1))
    first = [record.step_metrics[f"val_smape_{f}"][0] for f in folds]
    assert curves["val_smape"].iloc[0] == pytest.approx(np.mean(first), rel=1e-5)


def test_left_out_modalities_cannot_move_the_prediction() -> None:
    """A head trained on text only gives the same prediction whatever the image, unit and
    numeric inputs; trained on tabular only, whatever the text; the neighbour columns count as
    tabular inputs."""
    train, valid = synthetic(120, seed=1), synthetic(30, seed=2)
    rng = np.random.default_rng(0)
    for data in (train, valid):
        data.frame["nbr_tfidf_name_mean"] = data.target + rng.normal(0, 0.1, len(data))
    text_only = dataclasses.replace(CFG, epochs=2, modalities=("text",))
    model, _ = train_fold(train, valid, text_only, seed=0)
    assert model.spec.extra_numeric == ("nbr_tfidf_name_mean",)
    changed_frame = valid.frame.copy()
    changed_frame["unit"] = "count"
    changed_frame["nbr_tfidf_name_mean"] = 0.0
    changed_frame["value"] = 999.0
    changed = SplitData(changed_frame, valid.text, valid.image * 3 + 1, ~valid.image_mask)
    np.testing.assert_allclose(model.predict(changed), model.predict(valid), rtol=1e-6)

    tabular_only = dataclasses.replace(CFG, epochs=2, modalities=("tabular",))
    model, _ = train_fold(train, valid, tabular_only, seed=0)
    other_text = SplitData(valid.frame, valid.text * -2, valid.image, valid.image_mask)
    np.testing.assert_allclose(model.predict(other_text), model.predict(valid), rtol=1e-6)
    moved = valid.frame.copy()
    moved["nbr_tfidf_name_mean"] = moved["nbr_tfidf_name_mean"] + 3.0
    shifted = SplitData(moved, valid.text, valid.image, valid.image_mask)
    assert not np.allclose(model.predict(shifted), model.predict(valid))


def test_numeric_matrix_takes_given_arrays_as_the_table_columns() -> None:
    """Extra columns handed over as arrays (a MemberBatch's `arrays`) give the matrix read from
    the table; numeric parsed columns skip `to_numeric` yet read the same numbers as text ones."""
    from pricefuse.models.fusion.inputs import numeric_matrix

    data = synthetic(30, seed=4, with_target=False)
    rng = np.random.default_rng(0)
    frame = data.frame.assign(nbr_tfidf_name_mean=rng.normal(size=30), member_linear=np.nan)
    data = dataclasses.replace(data, frame=frame)
    extra = ("nbr_tfidf_name_mean", "member_linear", "nbr_absent_mean")
    given = {c: frame[c].to_numpy(dtype=np.float64) for c in extra[:2]}
    expected = numeric_matrix(data, extra)
    assert np.isnan(expected[:, -1]).all() and np.isnan(expected[:, -2]).all()
    np.testing.assert_array_equal(numeric_matrix(data, extra, given), expected)
    as_text = dataclasses.replace(data, frame=frame.astype({"pack": str, "value": object}))
    np.testing.assert_array_equal(numeric_matrix(as_text, extra), expected)
