"""Stage `embed`: parsed tables -> text/image embedding matrices + features/meta.json.

Glue only: the encoders live in `pricefuse.features`. Arrays are aligned with the parsed table
by row position; meta.json records the row-order hash of each split so a consumer can check it
reads embeddings of the table it holds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse import tracking
from pricefuse.config import Params
from pricefuse.errors import StageError
from pricefuse.features import row_hash
from pricefuse.features.image import ImageEncoder
from pricefuse.features.text import TextEncoder
from pricefuse.layout import HAS_IMAGE, ID, IMAGE_PATH, SPLITS, TEXT, Layout
from pricefuse.sources import ModelSourceError

COLUMNS = (ID, TEXT, IMAGE_PATH, HAS_IMAGE)


def set_torch_threads() -> int:
    """Use the cores this process may run on, unless the user fixed OMP_NUM_THREADS.

    torch's default counts the machine's cores, not the CPU affinity a container or `taskset`
    grants, and oversubscribed threads make CNN inference several times slower.
    """
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    return torch.get_num_threads()


def read_parsed(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StageError(f"parsed table {path} not found: run `pricefuse preprocess` first")
    table = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise StageError(f"{path} lacks column(s) {', '.join(missing)} (see layout.py)")
    return table


def load_encoders(params: Params) -> tuple[TextEncoder, ImageEncoder]:
    cfg = params.embed
    try:
        text = TextEncoder.from_ref(cfg.text_model, cfg.text_max_length, cfg.text_batch_size)
        image = ImageEncoder.from_ref(cfg.image_model, cfg.image_size, cfg.image_batch_size)
    except ModelSourceError as exc:
        raise StageError(str(exc)) from exc
    return text, image


def embed_split(
    table: pd.DataFrame, text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """(text_emb, image_emb, image_mask, timings) for one parsed table, rows in table order."""
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


def run(params: Params) -> None:
    import mlflow

    layout = Layout(params.data)
    tables = {split: read_parsed(layout.parsed(split)) for split in SPLITS}
    threads = set_torch_threads()
    text_encoder, image_encoder = load_encoders(params)
    layout.features_dir.mkdir(parents=True, exist_ok=True)

    with tracking.stage_run("embed", params, inputs=[layout.interim_dir]) as run:
        mlflow.set_tags({"text_model": text_encoder.ref, "image_model": image_encoder.ref})
        mlflow.log_params(
            {"text_dim": text_encoder.dim, "image_dim": image_encoder.dim, "torch_threads": threads}
        )
        totals = dict.fromkeys(("texts", "text_seconds", "images", "image_seconds"), 0.0)
        metrics: dict[str, float] = {}
        hashes: dict[str, str] = {}
        for split, table in tables.items():
            text_emb, image_emb, image_mask, timings = embed_split(
                table, text_encoder, image_encoder
            )
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
        tracking.log_metrics(metrics)
        meta = tracking.write_meta(
            layout.features_dir,
            "embed",
            run.info.run_id,
            text_model=text_encoder.ref,
            text_dim=text_encoder.dim,
            image_model=image_encoder.ref,
            image_dim=image_encoder.dim,
            **hashes,
        )
        mlflow.log_artifact(str(meta))
        coverage = ", ".join(
            f"{split} {int(metrics[f'rows_{split}'])} rows "
            f"({metrics[f'image_coverage_{split}']:.0%} with image)"
            for split in tables
        )
        speed = f"{metrics['texts_per_s']:.0f} texts/s"
        if "images_per_s" in metrics:
            speed += f", {metrics['images_per_s']:.1f} images/s"
        print(
            f"embed: {coverage}; text {text_encoder.dim}-d, image {image_encoder.dim}-d; "
            f"{speed} on {threads} thread(s) -> {layout.features_dir} (run {run.info.run_id})"
        )
