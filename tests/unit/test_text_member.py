"""The fine-tuned text member on tiny rows: MiniLM learns, the core records, the saved predictor
answers what the run computed, killed runs resume, and the served model includes the member.

Most tests use a 2-layer, 32-wide BERT with MiniLM's tokenizer (tests.support.tiny_encoder): the
machinery is the same as MiniLM's (a local-path model reference), at a fraction of the cost. The
two-process run is in tests/integration/test_text_distributed.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pricefuse.core.config import TextConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import Layout
from pricefuse.core.metrics import smape_from_log
from pricefuse.models.text import checkpoints as ckpt
from pricefuse.models.text.data import render_texts, template_fields
from pricefuse.models.text.member import (
    MODEL_ARTIFACT_PATH,
    check_config,
    disabled_text_member,
    train_text_member,
)
from pricefuse.models.text.predictor import MANIFEST, TextPredictor
from pricefuse.models.text.schedules import lr_factor
from pricefuse.models.text.training import TextTrainer, make_accelerator, train_text_kfold
from pricefuse.pipeline.members import producer_of, serving_producers
from tests.support import MINILM_REF, project_params, text_rows, tiny_encoder

TEXT_PLOTS = {
    "pred_vs_actual": ["actual", "predicted"],
    "smape_by_decile": ["decile", "price_low", "price_high", "text"],
    "learning_curves": ["epoch", "train_loss", "val_smape"],
}


@pytest.fixture(autouse=True)
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def tiny_cfg(ref: str, **changes) -> TextConfig:
    base = dataclasses.replace(
        project_params().text,
        model=ref,
        max_length=24,
        batch_size=8,
        epochs=2,
        smape_epochs=1,
        encoder_lr=1e-3,
        head_lr=1e-2,
        refit=False,
    )
    return dataclasses.replace(base, **changes)


def layout_in(directory: Path) -> Layout:
    return Layout(project_params(data={"models_dir": str(directory / "models")}).data)


@pytest.fixture(scope="module")
def trained(tiny_ref: str, tmp_path_factory: pytest.TempPathFactory):
    """The core on 24 rows, 2 folds, fold models averaged, embeddings exported."""
    root = tmp_path_factory.mktemp("text-member")
    cfg = tiny_cfg(tiny_ref, export_embeddings=True, frozen_epochs=1)
    layout = layout_in(root)
    train, test = text_rows(24, 0), text_rows(10, 1, train=False)
    record = train_text_member(cfg, train, test, layout, make_accelerator(cfg))
    return cfg, layout, train, test, record


def test_minilm_fine_tune_lowers_its_training_loss(tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        project_params().text,
        model=MINILM_REF,
        max_length=16,
        batch_size=8,
        epochs=3,
        smape_epochs=0,
        encoder_lr=2e-4,
        head_lr=1e-2,
        warmup_fraction=0.0,
        head_dropout=0.0,
    )
    rows = text_rows(16, 0)
    trainer = TextTrainer(
        cfg,
        make_accelerator(cfg),
        tmp_path / "checkpoints",  # the trainer writes fold checkpoints there
        render_texts(rows, cfg.template),
        rows["log_price"].to_numpy(),
        rows["fold"].to_numpy(),
        rows["sample_id"],
    )
    everything = np.arange(len(rows))
    history = trainer.train_model("fold_0", everything, np.zeros(0, np.int64)).history
    assert len(history["train_loss"]) == 3
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0], history


def test_core_returns_the_record_without_mlflow(trained, tmp_path: Path) -> None:
    cfg, layout, train, _test, record = trained
    model_dir = layout.model_dir("text")
    assert set(record.metrics) == {
        "smape_oof",
        "train_seconds",
        "resumed_models",
        "smape_fold_0",
        "smape_fold_1",
    }
    assert set(record.step_metrics) == {
        f"{s}_fold_{k}" for s in ("train_loss", "lr", "val_smape") for k in (0, 1)
    }
    assert all(len(curve) == cfg.epochs for curve in record.step_metrics.values())
    oof = pd.read_parquet(layout.oof_predictions("text"))
    assert list(oof.columns) == ["sample_id", "fold", "text"]
    assert oof["sample_id"].tolist() == train["sample_id"].tolist()
    y = train["log_price"].to_numpy()
    assert record.metrics["smape_oof"] == pytest.approx(smape_from_log(y, oof["text"]))
    assert [f.name for f in record.artifacts[MODEL_ARTIFACT_PATH]] == [
        MANIFEST,
        "fold_0.pt",
        "fold_1.pt",
    ]
    meta = record.meta[model_dir]
    assert meta["enabled"] and meta["combine"] == "fold_mean" and meta["resumed"] == []
    assert record.meta[layout.text_member_embeddings_dir]["dim"] == 32
    assert not (model_dir / "embeddings").exists()  # the served model ships the model dir
    assert not (tmp_path / "mlflow.db").exists() and not Path("mlruns").exists()
    written = record.write_plots("train_text", tmp_path / "plots")
    assert {p.name for p in written} == {f"{n}.{e}" for n in TEXT_PLOTS for e in ("csv", "png")}
    for name, columns in TEXT_PLOTS.items():
        frame = pd.read_csv(tmp_path / "plots" / "train_text" / f"{name}.csv")
        assert list(frame.columns) == columns, name
        assert frame.notna().all().all() and len(frame) > 0


def test_exported_embeddings_are_row_aligned_and_out_of_fold(trained) -> None:
    _cfg, layout, train, test, _record = trained
    train_emb = np.load(layout.text_member_embeddings("train"))
    test_emb = np.load(layout.text_member_embeddings("test"))
    assert train_emb.shape == (len(train), 32) and test_emb.shape == (len(test), 32)
    assert train_emb.dtype == np.float32 and np.isfinite(train_emb).all()
    # fold 0's rows carry the vectors of fold 0's model, which trained on fold 1 only
    saved = TextPredictor.load(layout.model_dir("text"))
    fold_0 = ckpt.load(layout.model_dir("text") / "fold_0.pt")
    held = fold_0["rows"].numpy()
    assert held.tolist() == np.flatnonzero(train["fold"].to_numpy() == 0).tolist()
    saved.models = saved.models[:1]  # fold_0.pt, as the manifest lists it
    _, vectors = saved.outputs(train.iloc[held], pooled=True)
    np.testing.assert_allclose(train_emb[held], vectors, atol=2e-3)  # stored as float16
    # test rows: the mean vector of the serving models (both folds here)
    assert not np.allclose(test_emb, 0.0)


def test_saved_predictor_reproduces_the_test_predictions(trained) -> None:
    cfg, layout, _train, test, _record = trained
    saved = TextPredictor.load(layout.model_dir("text"))
    assert saved.cfg == cfg and len(saved.models) == 2
    written = pd.read_parquet(layout.test_predictions("text"))
    assert written["sample_id"].tolist() == test["sample_id"].tolist()
    np.testing.assert_allclose(saved.predict(test), written["text"].to_numpy(), atol=1e-5)
    # row order does not matter (prediction batches are sorted by length internally)
    shuffled = test.iloc[::-1].reset_index(drop=True)
    np.testing.assert_allclose(saved.predict(shuffled), written["text"].to_numpy()[::-1], atol=1e-5)


def test_served_model_includes_the_member_when_enabled(trained) -> None:
    from pricefuse.models.predictors import load_predictor
    from pricefuse.pipeline.members import MemberBatch
    from pricefuse.serving.model import PriceEnsembleModel

    _cfg, layout, _train, test, _record = trained
    params = project_params(
        data={"models_dir": str(layout.model_dir("x").parent)},
        ensemble={"members": ["linear", "text"]},
    )
    assert "text" not in [p.name for p in serving_producers(project_params())]
    producers = serving_producers(params)
    assert producers[-1].name == "text" and producer_of("text", params).stage == "train_text"

    class State:  # the ensemble state's interface the served model uses
        members = ("text",)

    served = PriceEnsembleModel()
    served.params = params
    text_producer = producers[-1]
    served.producers = [(text_producer, load_predictor("text", layout.model_dir("text")))]
    served.state = State()
    batch = MemberBatch(
        test, np.zeros((len(test), 1)), np.zeros((len(test), 1)), np.ones(len(test))
    )
    columns = served.member_predictions(batch)
    written = pd.read_parquet(layout.test_predictions("text"))["text"].to_numpy()
    np.testing.assert_allclose(columns[:, 0], written, atol=1e-5)


def test_refit_serves_one_model_and_slims_the_fold_checkpoints(tiny_ref: str, tmp_path) -> None:
    cfg = tiny_cfg(tiny_ref, epochs=1, smape_epochs=0, refit=True)
    layout = layout_in(tmp_path)
    train, test = text_rows(16, 0), text_rows(6, 1, train=False)
    record = train_text_member(cfg, train, test, layout, make_accelerator(cfg))
    model_dir = layout.model_dir("text")
    assert [f.name for f in record.artifacts[MODEL_ARTIFACT_PATH]] == [MANIFEST, "refit.pt"]
    assert json.loads((model_dir / MANIFEST).read_text())["models"] == ["refit.pt"]
    for k in (0, 1):
        slim = ckpt.load(model_dir / f"fold_{k}.pt", weights=False)
        assert slim is not None and "trainable" not in slim and len(slim["pred"]) == 8
    assert set(record.step_metrics) >= {"train_loss_refit", "lr_refit"}
    saved = TextPredictor.load(model_dir)
    written = pd.read_parquet(layout.test_predictions("text"))["text"].to_numpy()
    np.testing.assert_allclose(saved.predict(test), written, atol=1e-5)
    # a finished run is not redone: every model resumes
    again = train_text_member(cfg, train, test, layout, make_accelerator(cfg))
    assert again.meta[model_dir]["resumed"] == ["fold_0", "fold_1", "refit"]
    assert again.metrics["smape_oof"] == record.metrics["smape_oof"]


class Killed(RuntimeError):
    pass


def test_a_killed_run_resumes_at_the_first_unfinished_fold(tiny_ref: str, tmp_path) -> None:
    cfg = tiny_cfg(tiny_ref, epochs=1, smape_epochs=0)
    rows, test = text_rows(18, 0, n_folds=3), text_rows(4, 1, train=False)
    args = (
        render_texts(rows, cfg.template),
        rows["log_price"].to_numpy(),
        rows["fold"].to_numpy(),
        rows["sample_id"],
        render_texts(test, cfg.template),
    )

    def kill_after_fold_0(name: str) -> None:
        if name == "fold_0":
            raise Killed(name)

    model_dir = tmp_path / "text"
    with pytest.raises(Killed):
        train_text_kfold(
            cfg, *args, model_dir, make_accelerator(cfg), on_model_done=kill_after_fold_0
        )
    assert sorted(p.name for p in model_dir.glob("*.pt")) == ["fold_0.pt"]
    (model_dir / ".fold_1.pt.tmp-999").write_bytes(b"torn write of a killed run")
    trained_now: list[str] = []
    resumed = train_text_kfold(
        cfg, *args, model_dir, make_accelerator(cfg), on_model_done=trained_now.append
    )
    assert resumed.resumed == ["fold_0"] and trained_now == ["fold_0", "fold_1", "fold_2"]
    assert not list(model_dir.glob(".*tmp*"))
    # every fold is seeded on its own: the resumed run equals an uninterrupted one
    fresh = train_text_kfold(cfg, *args, tmp_path / "fresh", make_accelerator(cfg))
    np.testing.assert_allclose(resumed.oof, fresh.oof, atol=1e-6)
    np.testing.assert_allclose(resumed.test, fresh.test, atol=1e-6)
    # other parameters: the checkpoints are stale and nothing resumes
    changed = dataclasses.replace(cfg, encoder_lr=cfg.encoder_lr / 2)
    rerun = train_text_kfold(changed, *args, model_dir, make_accelerator(changed))
    assert rerun.resumed == []


def test_checkpoints_are_written_atomically_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "fold_0.pt"
    payload = {"format": ckpt.FORMAT_VERSION, "fingerprint": "a", "trainable": {}, "head": {}}
    ckpt.save_atomic(path, payload)
    assert [p.name for p in tmp_path.iterdir()] == ["fold_0.pt"]
    assert ckpt.load(path, "a") is not None and ckpt.load(path, "b") is None
    path.write_bytes(b"truncated")
    assert ckpt.load(path, "a") is None
    with pytest.raises(ValueError, match="fold_<k>"):
        ckpt.checkpoint_path(tmp_path, "fold_x")


def test_fingerprint_ignores_serving_choices_only() -> None:
    cfg = project_params().text
    rows = text_rows(10, 0)
    args = (rows["sample_id"], rows["fold"].to_numpy(), rows["log_price"].to_numpy())
    base = ckpt.fingerprint(cfg, *args)
    serving = dataclasses.replace(cfg, refit=not cfg.refit, export_embeddings=True)
    assert ckpt.fingerprint(serving, *args) == base
    assert ckpt.fingerprint(dataclasses.replace(cfg, max_length=17), *args) != base
    other_y = (args[0], args[1], args[2] + 0.01)
    assert ckpt.fingerprint(cfg, *other_y) != base


def test_template_renders_parsed_fields_and_rejects_unknown_ones() -> None:
    parsed = pd.DataFrame(
        {
            "item_name": ["Tea (Pack of 6)", None],
            "value": [12.0, np.nan],
            "unit": ["ounce", "none"],
            "pack": [6, np.nan],
            "bullets": [np.array(["green", "organic"]), None],
        }
    )
    texts = render_texts(parsed, "{item_name} | {value} {unit} | pack {pack} | {bullets}")
    assert texts == ["Tea (Pack of 6) | 12 ounce | pack 6 | green ; organic", "| none | pack 1 |"]
    assert template_fields("{item_name} {description}") == ["item_name", "description"]
    with pytest.raises(ValueError, match="price"):
        template_fields("{item_name} {price}")


@pytest.mark.parametrize("schedule", ["linear", "onecycle", "cosine_restarts"])
def test_schedules_warm_up_then_decay(schedule: str) -> None:
    total, warmup, cycle = 100, 10, 30
    factors = [lr_factor(schedule, s, total, warmup, cycle) for s in range(total)]
    assert factors[0] < factors[warmup - 1] <= 1.0 + 1e-9
    assert max(factors) == pytest.approx(1.0)
    assert factors[-1] < 0.1
    if schedule == "cosine_restarts":
        assert factors[warmup + cycle] == pytest.approx(1.0)  # restart


def test_bad_parameters_fail_before_any_model_loads() -> None:
    cfg = project_params().text
    with pytest.raises(StageError, match=r"text\.kind"):
        check_config(dataclasses.replace(cfg, kind="rnn"))
    with pytest.raises(StageError, match="unknown field"):
        check_config(dataclasses.replace(cfg, template="{name}"))
    with pytest.raises(StageError, match="frozen_epochs"):
        check_config(dataclasses.replace(cfg, frozen_epochs=cfg.epochs))
    with pytest.raises(StageError, match="mixed_precision"):
        make_accelerator(dataclasses.replace(cfg, mixed_precision="fp8"))


def test_disabled_member_removes_predictions_and_keeps_checkpoints(tmp_path: Path) -> None:
    layout = layout_in(tmp_path)
    model_dir = layout.model_dir("text")
    model_dir.mkdir(parents=True)
    for name in ("oof.parquet", "test.parquet", MANIFEST, "fold_0.pt"):
        (model_dir / name).write_bytes(b"x")
    layout.text_member_embeddings_dir.mkdir(parents=True)
    layout.text_member_embeddings("train").write_bytes(b"x")
    record = disabled_text_member(layout)
    assert "ensemble.members" in record.summary and record.metrics == {}
    assert record.meta[model_dir] == {"enabled": False}
    assert sorted(p.name for p in model_dir.iterdir()) == ["fold_0.pt"]
    assert list(layout.text_member_embeddings_dir.iterdir()) == []


def test_stage_is_disabled_by_default_and_logs_one_run(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    from pricefuse.stages import train_text

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = project_params(mlflow={"experiment": "t"})
    assert "text" not in params.ensemble.members
    layout = Layout(params.data)
    layout.interim_dir.mkdir(parents=True)
    text_rows(8, 0).to_parquet(layout.parsed("train"))
    text_rows(4, 1, train=False).to_parquet(layout.parsed("test"))

    train_text.run(params)

    meta = json.loads((layout.model_dir("text") / "meta.json").read_text())
    assert meta["enabled"] is False and meta["stage"] == "train_text"
    assert (tmp_path / "plots" / "train_text").is_dir()  # a DVC output, even when empty
    assert json.loads((tmp_path / "metrics" / "train_text.json").read_text()) == {}
    run = mlflow.MlflowClient(uri).get_run(meta["run_id"])
    assert run.data.tags["stage"] == "train_text" and run.data.params["text.epochs"]


def test_pooling_reads_real_tokens_only() -> None:
    from pricefuse.models.text.backbones import pool_hidden

    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # row 0: 0..3, 1: 4..7
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool_hidden(hidden, mask, "mean").flatten().tolist() == [0.5, 5.5]
    assert pool_hidden(hidden, mask, "cls").flatten().tolist() == [0.0, 4.0]
    assert pool_hidden(hidden, mask, "last").flatten().tolist() == [1.0, 7.0]
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden(hidden, mask, "max")


def test_gradient_checkpointing_changes_memory_not_results(tiny_ref: str) -> None:
    from pricefuse.models.text.backbones import load_encoder

    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones_like(ids)
    outputs = []
    for checkpointing in (False, True):
        backbone = load_encoder(tiny_ref, "mean", checkpointing)
        backbone.module.train()
        torch.manual_seed(0)  # same dropout masks
        pooled = backbone.module(ids, mask)
        pooled.sum().backward()
        grads = [p.grad for p in backbone.module.parameters()]
        assert all(g is not None for g in grads)
        outputs.append((pooled.detach(), grads[0]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1])
