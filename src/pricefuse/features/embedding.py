"""The `embed` stage's work: parsed tables -> text/image embedding matrices + features/meta.json.

Arrays are plain .npy files aligned with the parsed table by row position; meta.json records the
row-order hash of each split (`row_hash_<split>`), which every consumer checks so it never pairs
a row with another product's embedding. `embed_tables` returns what the stage records and never
calls MLflow; the encoders are passed in, so a test can use small stand-ins.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pricefuse.core.config import EmbedConfig
from pricefuse.core.device import resolve_device
from pricefuse.core.errors import StageError
from pricefuse.core.layout import HAS_IMAGE, ID, IMAGE_PATH, SPLITS, TEXT, Layout
from pricefuse.core.records import StageRecord
from pricefuse.core.rows import row_hash
from pricefuse.core.sources import ModelSourceError
from pricefuse.features.image import ImageEncoder
from pricefuse.features.text import TextEncoder
from pricefuse.pipeline.inputs import load_parsed

COLUMNS = (ID, TEXT, IMAGE_PATH, HAS_IMAGE)


@dataclass(frozen=True)
class Encoders:
    """The two encoders of a run, the device they run on and the torch threads of the process
    (recorded as a param)."""

    text: TextEncoder
    image: ImageEncoder
    threads: int
    device: str = "cpu"


def set_torch_threads() -> int:
    """Use the cores this process may run on, unless the user fixed OMP_NUM_THREADS.

    torch's default counts the machine's cores, not the CPU affinity a container or `taskset`
    grants, and oversubscribed threads make CNN inference several times slower.
    """
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    return torch.get_num_threads()


def load_embed_inputs(layout: Layout) -> dict[str, pd.DataFrame]:
    """The parsed table of each split, checked for the columns embed reads (before any model is
    loaded: a stale table should fail in a second, not after minutes of encoder start-up)."""
    tables = {}
    for split in SPLITS:
        table = load_parsed(layout, split)
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise StageError(
                f"{layout.parsed(split)} lacks column(s) {', '.join(missing)} (see layout.py)"
            )
        tables[split] = table
    return tables


def load_encoders(cfg: EmbedConfig) -> Encoders:
    """Both encoders from their refs on `embed.device`, in half precision there if it is a GPU
    (a missing package or file, an unknown device or `cuda` without a GPU is a StageError)."""
    device = resolve_device(cfg.device, "embed.device")
    if cfg.num_workers < 0:
        raise StageError(f"embed.num_workers must be >= 0, got {cfg.num_workers}")
    threads = set_torch_threads()
    try:
        text = TextEncoder.from_ref(
            cfg.text_model, cfg.text_max_length, cfg.text_batch_size, device, half_precision=True
        )
        image = ImageEncoder.from_ref(
            cfg.image_model,
            cfg.image_size,
            cfg.image_batch_size,
            device,
            cfg.num_workers,
            half_precision=True,
        )
    except ModelSourceError as exc:
        raise StageError(str(exc)) from exc
    return Encoders(text, image, threads, device)


def embed_split(
    table: pd.DataFrame, text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """(text_emb, image_emb, image_mask, timings) for one parsed table, rows in table order.

    A row whose image cannot be read gets a zero vector and mask False, so a consumer can tell
    "no image" from "an image that embeds to zeros".
    """
    texts = table[TEXT].fillna("").astype(str).tolist()
    start = time.perf_counter()
    text_emb = text_encoder.encode(texts, progress=True)
    text_seconds = time.perf_counter() - start

    has_image = table[HAS_IMAGE].fillna(False).astype(bool).to_numpy()
    paths = table[IMAGE_PATH].fillna("").astype(str).where(has_image, "").tolist()
    start = time.perf_counter()
    image_emb, image_mask = image_encoder.encode_paths(paths, progress=True)
    image_seconds = time.perf_counter() - start
    timings = {
        "texts": float(len(texts)),
        "text_seconds": text_seconds,
        "images": float(has_image.sum()),
        "image_seconds": image_seconds,
        "images_failed": float((has_image & ~image_mask).sum()),
    }
    return text_emb, image_emb, image_mask, timings


def embed_tables(
    tables: dict[str, pd.DataFrame], encoders: Encoders, layout: Layout
) -> StageRecord:
    """Encode every split, write its arrays under `layout.features_dir`, and return what the stage
    records: coverage and throughput metrics, the encoders (tags, params) and the row hashes."""
    layout.features_dir.mkdir(parents=True, exist_ok=True)
    totals = dict.fromkeys(("texts", "text_seconds", "images", "image_seconds"), 0.0)
    metrics: dict[str, float] = {}
    hashes: dict[str, str] = {}
    for split, table in tables.items():
        text_emb, image_emb, image_mask, timings = embed_split(table, encoders.text, encoders.image)
        np.save(layout.text_embeddings(split), text_emb)
        np.save(layout.image_embeddings(split), image_emb)
        np.save(layout.image_mask(split), image_mask)
        hashes[f"row_hash_{split}"] = row_hash(table[ID].tolist())
        for key in totals:
            totals[key] += timings[key]
        metrics[f"rows_{split}"] = float(len(table))
        metrics[f"image_coverage_{split}"] = float(image_mask.mean()) if len(table) else 0.0
        metrics[f"images_failed_{split}"] = timings["images_failed"]
    metrics["texts_per_s"] = totals["texts"] / max(totals["text_seconds"], 1e-9)
    if totals["images"]:
        metrics["images_per_s"] = totals["images"] / max(totals["image_seconds"], 1e-9)

    text, image = encoders.text, encoders.image
    coverage = ", ".join(
        f"{split} {len(table)} rows ({metrics[f'image_coverage_{split}']:.0%} with image)"
        for split, table in tables.items()
    )
    speed = f"{metrics['texts_per_s']:.0f} texts/s"
    if "images_per_s" in metrics:
        speed += f", {metrics['images_per_s']:.1f} images/s"
    where = f"{encoders.threads} thread(s)" if encoders.device == "cpu" else encoders.device
    return StageRecord(
        summary=(
            f"embed: {coverage}; text {text.dim}-d, image {image.dim}-d; {speed} on "
            f"{where} -> {layout.features_dir}"
        ),
        metrics=metrics,
        tags={"text_model": text.ref, "image_model": image.ref},
        params={"text_dim": text.dim, "image_dim": image.dim, "torch_threads": encoders.threads},
        meta={
            layout.features_dir: {
                "text_model": text.ref,
                "text_dim": text.dim,
                "image_model": image.ref,
                "image_dim": image.dim,
                **hashes,
            }
        },
        # Logged after `tracking.record` writes it, so the run holds the meta.json it wrote.
        artifacts={"": [layout.features_dir / "meta.json"]},
    )
