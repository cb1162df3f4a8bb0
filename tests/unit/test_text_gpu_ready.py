"""The text member fit for real GPUs, checked on CPU: the precision a device gets, the loss read
every `text.log_every` optimizer steps (not per batch), the reload check under autocast-like
noise, and one backbone load per process with folds that stay independent.

The models are the 2-layer, 32-wide BERT of tests.support.tiny_encoder (the LoRA decoder's fold
independence and dtype are in tests/unit/test_decoder_lora_tiny.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pricefuse.core.config import TextConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import Layout
from pricefuse.models.text import backbones, precision, predictor, training
from pricefuse.models.text.data import render_texts
from pricefuse.models.text.member import check_reloaded, compare_reloaded, train_text_member
from pricefuse.models.text.precision import (
    Precision,
    choose_precision,
    device_precision,
    reload_tolerance,
)
from pricefuse.models.text.training import TextTrainer, make_accelerator, time_fold
from tests.support import project_params, text_rows
from tests.unit import test_text_member as member

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


# test_text_member's fixtures: the tiny encoder (built once per module) and two torch threads.
tiny_ref = member.tiny_ref
two_threads = member.two_threads


def tiny_cfg(ref: str, **changes) -> TextConfig:
    """test_text_member's tiny config, in batches of 4 (more optimizer steps per epoch)."""
    return member.tiny_cfg(ref, **{"batch_size": 4, **changes})


# --- precision from what the device does natively ------------------------------------------


@pytest.mark.parametrize(
    ("requested", "device", "capability", "mixed", "scaler", "param_dtype", "warns"),
    [
        # CPU (or any non-CUDA device): fp32, whatever the preference
        ("auto", "cpu", None, "no", False, FP32, False),
        ("bf16", "cpu", None, "no", False, FP32, False),
        ("fp16", "cpu", None, "no", False, FP32, False),
        ("bf16", "mps", None, "no", False, FP32, False),
        # `no` forces fp32 on any GPU
        ("no", "cuda", (9, 0), "no", False, FP32, False),
        ("no", "cuda", (7, 5), "no", False, FP32, False),
        # native bf16 (Ampere+): bf16 autocast, bf16 base weights
        ("auto", "cuda", (8, 0), "bf16", False, BF16, False),
        ("bf16", "cuda", (8, 0), "bf16", False, BF16, False),
        ("bf16", "cuda", (8, 9), "bf16", False, BF16, False),
        ("auto", "cuda", (9, 0), "bf16", False, BF16, False),
        # T4 / V100: bf16 would be emulated -> fp16 + loss scaling, fp32 base weights
        ("auto", "cuda", (7, 5), "fp16", True, FP32, False),
        ("bf16", "cuda", (7, 5), "fp16", True, FP32, True),
        ("bf16", "cuda", (7, 0), "fp16", True, FP32, True),
        ("auto", "cuda", (6, 0), "fp16", True, FP32, False),  # P100: fast fp16
        # an explicit fp16 is honoured, base weights stay fp32 (Gemma overflows in pure fp16)
        ("fp16", "cuda", (9, 0), "fp16", True, FP32, False),
        ("fp16", "cuda", (6, 1), "fp16", True, FP32, False),
        # neither native bf16 nor fast fp16 (Pascal consumer cards): fp32
        ("auto", "cuda", (6, 1), "no", False, FP32, True),
        ("bf16", "cuda", (5, 2), "no", False, FP32, True),
    ],
)
def test_precision_follows_what_the_device_does_natively(
    requested, device, capability, mixed, scaler, param_dtype, warns
) -> None:
    chosen = choose_precision(requested, device, capability)
    assert (chosen.mixed, chosen.scaler, chosen.param_dtype) == (mixed, scaler, param_dtype)
    assert (chosen.note is not None) == warns
    assert Precision.of(chosen.mixed).param_dtype == chosen.param_dtype  # what the trainer rebuilds


def test_unknown_preferences_are_refused() -> None:
    with pytest.raises(ValueError, match="auto, bf16, fp16, no"):
        choose_precision("fp8", "cuda", (9, 0))
    with pytest.raises(StageError, match="mixed_precision"):
        make_accelerator(dataclasses.replace(project_params().text, mixed_precision="fp32"))


def test_bf16_without_native_support_warns_once_per_process(monkeypatch, caplog) -> None:
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision, "cuda_capability", lambda: (7, 5))
    monkeypatch.delenv("RANK", raising=False)
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        first = device_precision("bf16", "cuda")
        second = device_precision("bf16", "cuda")
        device_precision("auto", "cuda")  # fp16 is what `auto` means there: no warning
    assert first == second and (first.mixed, first.scaler) == ("fp16", True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no native bf16" in warnings[0].getMessage()
    # torchrun: only the first process says it
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setenv("RANK", "1")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        device_precision("bf16", "cuda")
    assert not caplog.records


def test_cpu_accelerator_trains_in_fp32_and_the_run_records_it(tiny_ref: str, tmp_path) -> None:
    cfg = tiny_cfg(tiny_ref, epochs=1, smape_epochs=0, mixed_precision="bf16")
    acc = make_accelerator(cfg)
    assert acc.mixed_precision == "no"
    layout = Layout(project_params(data={"models_dir": str(tmp_path / "models")}).data)
    train, test = text_rows(12, 0), text_rows(5, 1, train=False)
    record = train_text_member(cfg, train, test, layout, acc)
    assert record.params["text_precision"] == "fp32"
    assert record.meta[layout.model_dir("text")]["precision"] == "fp32"
    assert "in fp32" in record.summary


def test_the_decoder_base_dtype_follows_the_device(monkeypatch) -> None:
    """`load_backbone` without a dtype (serving) asks the device like the trainer does."""
    for capability, preference, expected in [
        (None, "auto", FP32),
        ((7, 5), "bf16", FP32),  # T4: fp16 autocast over fp32 weights, never emulated bf16
        ((7, 0), "auto", FP32),
        ((8, 0), "auto", BF16),
        ((9, 0), "no", FP32),
    ]:
        monkeypatch.setattr(backbones, "cuda_capability", lambda c=capability: c)
        assert backbones._device_param_dtype(preference) == expected, (capability, preference)


def test_reload_tolerance_derives_from_the_dtype() -> None:
    assert reload_tolerance("no") == pytest.approx(1e-4)
    assert reload_tolerance("fp16") == pytest.approx(4 * 2**-10)
    assert reload_tolerance("bf16") == pytest.approx(4 * 2**-7)


# --- the loss, summed on the device, read every log_every optimizer steps ------------------


def _trainer(cfg: TextConfig, rows, tmp_path: Path) -> TextTrainer:
    return TextTrainer(
        cfg,
        make_accelerator(cfg),
        tmp_path / "checkpoints",
        render_texts(rows, cfg.template),
        rows["log_price"].to_numpy(),
        rows["fold"].to_numpy(),
        rows["sample_id"],
    )


@pytest.mark.parametrize(("log_every", "grad_accum"), [(1, 1), (2, 1), (1, 2), (3, 1)])
def test_training_loss_is_read_every_log_every_optimizer_steps(
    tiny_ref: str, tmp_path, monkeypatch, log_every, grad_accum
) -> None:
    # 16 rows, batches of 4: 4 micro-batches an epoch, 4 / grad_accum optimizer steps
    per_epoch = 4 // grad_accum
    windows = per_epoch // log_every  # a last, partial window counts in the epoch's mean only
    cfg = tiny_cfg(tiny_ref, log_every=log_every, grad_accum=grad_accum, head_dropout=0.0)
    rows = text_rows(16, 0)
    trainer = _trainer(cfg, rows, tmp_path)
    reads = []
    real_read = TextTrainer._reduced_mean

    def counted(self, total, n):
        reads.append(n)
        return real_read(self, total, n)

    monkeypatch.setattr(TextTrainer, "_reduced_mean", counted)
    syncs = []  # values read back from tensors, outside torch itself (AdamW reads its step
    real_item, real_float = torch.Tensor.item, torch.Tensor.__float__  # counters, on the CPU)

    def reading(real):
        def read(tensor):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}torch{os.sep}" not in caller:
                syncs.append(caller)
            return real(tensor)

        return read

    monkeypatch.setattr(torch.Tensor, "item", reading(real_item))
    monkeypatch.setattr(torch.Tensor, "__float__", reading(real_float))
    real_epoch = TextTrainer._train_epoch
    epoch_syncs = []

    def epoch(self, *args, **kwargs):
        before = len(syncs)
        result = real_epoch(self, *args, **kwargs)
        epoch_syncs.append(len(syncs) - before)
        return result

    monkeypatch.setattr(TextTrainer, "_train_epoch", epoch)
    history = trainer.train_model("fold_0", np.arange(16), np.zeros(0, np.int64)).history

    assert trainer.optimizer_steps == cfg.epochs * 4 // grad_accum
    assert len(history["step_loss"]) == cfg.epochs * windows
    # one read per window and one per epoch: never one per micro-batch
    assert len(reads) == cfg.epochs * (windows + 1)
    assert epoch_syncs == [windows + 1] * cfg.epochs
    if log_every == 1 and grad_accum == 1:  # equal windows: their mean is the epoch's mean
        for k in range(cfg.epochs):
            window = history["step_loss"][k * per_epoch : (k + 1) * per_epoch]
            assert np.mean(window) == pytest.approx(history["train_loss"][k], rel=1e-5)


def test_log_every_is_not_part_of_the_checkpoint_fingerprint() -> None:
    from pricefuse.models.text import checkpoints as ckpt

    cfg = project_params().text
    rows = text_rows(10, 0)
    args = (rows["sample_id"], rows["fold"].to_numpy(), rows["log_price"].to_numpy())
    other = dataclasses.replace(cfg, log_every=cfg.log_every + 7)
    assert ckpt.fingerprint(other, *args) == ckpt.fingerprint(cfg, *args)


# --- one backbone load per process; folds independent --------------------------------------


@pytest.fixture
def count_loads(monkeypatch) -> list[str]:
    """Every backbone load the trainer or the predictor makes."""
    loads: list[str] = []
    real = backbones.load_backbone

    def counted(cfg, dtype=None):
        loads.append(cfg.model)
        return real(cfg, dtype)

    monkeypatch.setattr(training, "load_backbone", counted)
    monkeypatch.setattr(predictor, "load_backbone", counted)
    return loads


def test_a_fold_trained_after_another_equals_it_trained_alone(
    tiny_ref: str, tmp_path, count_loads
) -> None:
    cfg = tiny_cfg(tiny_ref, frozen_epochs=1, export_embeddings=True)
    rows = text_rows(16, 0)
    folds = rows["fold"].to_numpy()
    fit_1, held_1 = np.flatnonzero(folds != 1), np.flatnonzero(folds == 1)

    after = _trainer(cfg, rows, tmp_path / "after")
    first = after.train_model("fold_0", np.flatnonzero(folds != 0), np.flatnonzero(folds == 0))
    second = after.train_model("fold_1", fit_1, held_1)
    alone = _trainer(cfg, rows, tmp_path / "alone").train_model("fold_1", fit_1, held_1)

    assert count_loads == [tiny_ref, tiny_ref]  # one per trainer, not one per model
    assert not np.allclose(first.pred, np.zeros_like(first.pred))
    np.testing.assert_allclose(second.pred, alone.pred, atol=1e-6)
    np.testing.assert_allclose(second.pooled, alone.pooled, atol=1e-3)  # stored as float16
    for series in ("train_loss", "val_smape"):
        np.testing.assert_allclose(second.history[series], alone.history[series], atol=1e-6)


def test_a_run_loads_the_backbone_once(tiny_ref: str, tmp_path, count_loads) -> None:
    """Two folds, the refit, the test predictions and the reload check: one load."""
    cfg = tiny_cfg(tiny_ref, epochs=1, smape_epochs=0, refit=True)
    layout = Layout(project_params(data={"models_dir": str(tmp_path / "models")}).data)
    train, test = text_rows(12, 0), text_rows(5, 1, train=False)
    record = train_text_member(cfg, train, test, layout, make_accelerator(cfg))
    assert count_loads == [tiny_ref]
    assert record.meta[layout.model_dir("text")]["combine"] == "refit"
    # a resumed run loads it once too (and reuses it for the test predictions and the check)
    count_loads.clear()
    again = train_text_member(cfg, train, test, layout, make_accelerator(cfg))
    assert again.meta[layout.model_dir("text")]["resumed"] == ["fold_0", "fold_1", "refit"]
    assert count_loads == [tiny_ref]


def test_time_fold_trains_one_fold_for_a_benchmark(tiny_ref: str, tmp_path, count_loads) -> None:
    cfg = tiny_cfg(tiny_ref, epochs=1, smape_epochs=0, log_every=1)
    rows = text_rows(16, 0)
    timing = time_fold(
        cfg,
        render_texts(rows, cfg.template),
        rows["log_price"].to_numpy(),
        rows["fold"].to_numpy(),
        tmp_path / "bench",
        make_accelerator(cfg),
        fold=1,
    )
    assert (timing.name, timing.precision, timing.device) == ("fold_1", "fp32", "cpu")
    assert timing.optimizer_steps == 2 and timing.rows_seen == 8 and timing.rows_per_second > 0
    assert len(timing.history["step_loss"]) == 2 and timing.pred.shape == (8,)
    assert count_loads == [tiny_ref]


# --- the reload check: the training run's path, a tolerance the dtype sets -----------------


@pytest.fixture(scope="module")
def run(tiny_ref: str, tmp_path_factory: pytest.TempPathFactory):
    """A finished run (2 fold models averaged) and its test rows and predictions."""
    root = tmp_path_factory.mktemp("reload")
    cfg = tiny_cfg(tiny_ref, epochs=1, smape_epochs=0, predict_batch_size=4)
    layout = Layout(project_params(data={"models_dir": str(root / "models")}).data)
    train, test = text_rows(12, 0), text_rows(10, 1, train=False)
    train_text_member(cfg, train, test, layout, make_accelerator(cfg))
    import pandas as pd

    written = pd.read_parquet(layout.test_predictions("text"))["text"].to_numpy()
    return layout.model_dir("text"), test, written


def _bf16_rounded(values: np.ndarray) -> np.ndarray:
    return torch.tensor(np.array(values)).to(torch.bfloat16).double().numpy()


def test_bf16_rounding_noise_passes_the_check_and_fails_an_fp32_one(run) -> None:
    _model_dir, _test, written = run
    noisy = _bf16_rounded(written)
    assert np.abs(noisy - written).max() > reload_tolerance("no")  # real noise, not none
    compare_reloaded(noisy, written, "bf16")
    compare_reloaded(written + 1e-3, written, "fp16")
    with pytest.raises(StageError, match="saving lost something"):
        compare_reloaded(noisy, written, "no")
    with pytest.raises(StageError, match="saving lost something"):
        compare_reloaded(written * np.nan, written, "bf16")


def test_the_check_passes_a_sound_run_under_real_cpu_bf16_autocast(run) -> None:
    """The run predicted in fp32; re-predicting its first batch under bf16 autocast is noise of
    the size a GPU's autocast makes, which the bf16 tolerance allows."""
    model_dir, test, written = run
    check_reloaded(model_dir, test, written, mixed="no")
    check_reloaded(model_dir, test, written, mixed="bf16", device="cpu")


def test_the_check_fails_a_checkpoint_with_wrong_head_weights(run, tmp_path) -> None:
    model_dir, test, written = run
    broken = tmp_path / "text"
    shutil.copytree(model_dir, broken)
    payload = torch.load(broken / "fold_0.pt", weights_only=True)
    payload["head"]["1.weight"] = torch.randn_like(payload["head"]["1.weight"])
    torch.save(payload, broken / "fold_0.pt")
    with pytest.raises(StageError, match="saving lost something"):
        check_reloaded(broken, test, written, mixed="bf16", device="cpu")
