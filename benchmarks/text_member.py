"""Served latency of the text member: one refit model against the K fold models averaged.

    python benchmarks/text_member.py                       # MiniLM, params.yaml's text section
    python benchmarks/text_member.py --folds 5 --threads 2 --requests 20
    python benchmarks/text_member.py --results             # also docs/results/text_member.json

What it times is the served path, `TextPredictor` (pricefuse.models.text.predictor) on parsed
catalog rows: template, tokenizer, backbone, head, per request of one row and per row of a 64-row
batch, with `text.refit: true` (one model) and `false` (K fold checkpoints sharing one backbone,
each loaded in turn: what a fold-averaged text member costs per request). The weights are the
pretrained backbone's with a fresh head: fine-tuned weights cost the same. Also: load time and
the size of the checkpoints the served model ships. Figures depend on the machine and its load;
not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from benchmarks.results import add_results_option, table, write_results  # noqa: E402

from pricefuse.core import compat  # noqa: E402

compat.apply()

from pricefuse.core.config import load_params  # noqa: E402
from pricefuse.data.catalog import format_catalog, parse_frame  # noqa: E402
from pricefuse.models.text import checkpoints as ckpt  # noqa: E402
from pricefuse.models.text.backbones import load_backbone  # noqa: E402
from pricefuse.models.text.predictor import TextPredictor, write_manifest  # noqa: E402
from pricefuse.models.text.regressor import TargetScale, build_regressor, head_state  # noqa: E402

BULLETS = (
    "Rich, smooth flavour roasted in small batches for a consistent cup every time",
    "Resealable bag keeps it fresh; store in a cool, dry place away from sunlight",
    "Certified organic and fair trade, sourced from family farms",
)


def rows(n: int, seed: int):
    rng = np.random.default_rng(seed)
    raw = [
        format_catalog(
            f"Acme Premium Product {i} Whole Bean Coffee, {int(rng.integers(8, 33))} Ounce "
            f"(Pack of {int(rng.choice([1, 2, 6]))})",
            BULLETS,
            "A dependable everyday product.",
            float(rng.integers(8, 33)),
            "Ounce",
        )
        for i in range(n)
    ]
    import pandas as pd

    parsed, _ = parse_frame(pd.DataFrame({"catalog_content": raw}))
    return parsed


def write_model(directory: Path, cfg, folds: int) -> int:
    """Checkpoints + manifest as train_text writes them; returns their total size in bytes."""
    backbone = load_backbone(cfg)
    regressor = build_regressor(backbone, cfg.head_dropout)
    payload = {
        "format": ckpt.FORMAT_VERSION,
        "fingerprint": "benchmark",
        "scale": TargetScale(2.5, 1.0, 0.0, 8.0).to_dict(),
        "trainable": backbone.trainable_state_dict(),
        "head": head_state(regressor),
    }
    names = [ckpt.REFIT] if folds == 1 else [ckpt.model_name(k) for k in range(folds)]
    files = [ckpt.save_atomic(ckpt.checkpoint_path(directory, n), payload) for n in names]
    write_manifest(directory, cfg, files)
    return sum(f.stat().st_size for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=None, help="default: preprocess.n_folds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    add_results_option(parser, "text_member")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    folds = args.folds or params.preprocess.n_folds
    single, batch = rows(args.requests, 0), rows(args.batch, 1)
    print(
        f"{params.text.model}, max_length {params.text.max_length}, {args.threads} thread(s), "
        f"{args.requests} one-row requests, one {args.batch}-row batch"
    )
    results = []
    for refit in (True, False):
        cfg = dataclasses.replace(params.text, refit=refit)
        with tempfile.TemporaryDirectory() as tmp:
            size = write_model(Path(tmp), cfg, 1 if refit else folds)
            started = time.perf_counter()
            predictor = TextPredictor.load(tmp)
            load_s = time.perf_counter() - started
            predictor.predict(single.iloc[:1])  # warm-up
            latencies = []
            for i in range(args.requests):
                started = time.perf_counter()
                predictor.predict(single.iloc[i : i + 1])
                latencies.append(time.perf_counter() - started)
            started = time.perf_counter()
            predictor.predict(batch)
            per_row = (time.perf_counter() - started) / len(batch)
        label = "refit (1 model)" if refit else f"fold mean ({folds} models)"
        print(
            f"{label:>22}: one-row request median {1e3 * statistics.median(latencies):.1f} ms, "
            f"batched {1e3 * per_row:.1f} ms/row, load {load_s:.1f} s, "
            f"checkpoints {size / 1e6:.0f} MB"
        )
        median_ms = 1e3 * statistics.median(latencies)
        results.append([label, median_ms, 1e3 * per_row, load_s, size / 1e6])
    if args.results:
        title = (
            f"The served text member: {params.text.model}, max_length {params.text.max_length}, "
            f"{args.threads} thread(s), {args.requests} one-row requests, a {args.batch}-row batch"
        )
        columns = ["served model", "one-row request (ms)", "batched (ms/row)", "load (s)"]
        columns.append("checkpoints (MB)")
        formats = [None, ".1f", ".1f", ".1f", ".0f"]
        write_results(args.results, [table(title, columns, results, formats=formats)])


if __name__ == "__main__":
    main()
