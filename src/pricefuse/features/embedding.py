"""The `embed` stage's work: parsed tables -> text/image embedding matrices + features/meta.json.

Arrays are plain .npy files aligned with the parsed table by row position; meta.json records the
row-order hash of each split (`row_hash_<split>`), which every consumer checks so it never pairs
a row with another product's embedding. `embed_tables` returns what the stage records and never
calls MLflow; the encoders are passed in, so a test can use small stand-ins.

Resume: each split is encoded in chunks of `embed.chunk_rows` rows, always (resumed or not), and
every finished chunk is written atomically to `layout.embed_checkpoints` (outside the stage's DVC
output, which DVC deletes before a run). A re-run after a kill takes over a chunk only when its key
matches: the encoders and every setting that changes a vector bit (`vector_settings`), the split,
and the chunk's ids, texts, image paths, `has_image` and image file sizes. Chunking is the only
path because the encoders batch within what they are given (the text encoder sorts a chunk by
length), so a resumed run writes the same bytes as an uninterrupted one. The checkpoints are
deleted once every split's arrays are written.

The LLM text block (`embed.llm`, opt-in: pricefuse.features.llm) rides in the same chunks: a
chunk then also holds the raw pooled vectors of its rows' `llm_texts`, and its key also covers
those texts and the LLM settings (off, keys and files are exactly what they were without it).
Once every split is encoded, a `Standardiser` is fitted on the train rows' raw vectors and both
splits are written standardised as `layout.llm_embeddings(split)`, the standardiser's arrays and
`llm.json` beside them (the served model standardises request rows with the same arrays).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pricefuse.core.config import EmbedConfig, LlmEmbedConfig
from pricefuse.core.device import resolve_device
from pricefuse.core.errors import StageError
from pricefuse.core.layout import HAS_IMAGE, ID, IMAGE_PATH, SPLITS, TEXT, Layout
from pricefuse.core.records import StageRecord
from pricefuse.core.rows import row_hash
from pricefuse.core.sources import ModelSourceError
from pricefuse.features.image import ImageEncoder
from pricefuse.features.llm import LlmEncoder, Standardiser, Variant, llm_texts, write_block_meta
from pricefuse.features.text import TextEncoder
from pricefuse.pipeline.inputs import load_parsed

COLUMNS = (ID, TEXT, IMAGE_PATH, HAS_IMAGE)
# The checkpoint file's layout; part of every chunk key, so a change of format recomputes.
CHUNK_FORMAT = 1
# What a chunk's encoding times are summed as (the llm ones stay 0 while the block is off).
TIMINGS = ("texts", "text_seconds", "images", "image_seconds", "llm_texts", "llm_seconds")


@dataclass(frozen=True)
class LlmBlock:
    """The LLM text block's encoder, the hidden states it reads and how long its load took."""

    encoder: LlmEncoder
    variant: Variant
    load_seconds: float = 0.0

    @property
    def dim(self) -> int:
        width = int(self.encoder.dim)
        return 2 * width if self.variant.pooling == "mean_last" else width


@dataclass(frozen=True)
class Encoders:
    """The two encoders of a run (and the LLM block's, when `embed.llm.model` is set), the device
    they run on and the torch threads of the process (recorded as a param)."""

    text: TextEncoder
    image: ImageEncoder
    threads: int
    device: str = "cpu"
    llm: LlmBlock | None = None


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
    check_chunk_rows(cfg)
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
    llm = load_llm_block(cfg.llm, device) if cfg.llm.enabled else None
    return Encoders(text, image, threads, device, llm)


def load_llm_block(cfg: LlmEmbedConfig, device: str) -> LlmBlock:
    """The decoder of `embed.llm.model` on `device`, with the configured layer checked against
    it (a StageError before any row is encoded), and its load time."""
    started = time.perf_counter()
    try:
        encoder = LlmEncoder.from_ref(cfg.model, cfg.max_length, cfg.batch_size, device)
        variant = Variant(cfg.layer, cfg.pooling)
        encoder.layer_index(variant.layer)  # the bounds check encode() would make per batch
    except (ModelSourceError, ValueError) as exc:
        raise StageError(f"embed.llm: {exc}") from exc
    return LlmBlock(encoder, variant, time.perf_counter() - started)


def check_chunk_rows(cfg: EmbedConfig) -> int:
    """`embed.chunk_rows`, refused below 1 (before any model is loaded)."""
    if cfg.chunk_rows < 1:
        raise StageError(
            f"embed.chunk_rows must be >= 1 (rows per checkpointed chunk), got {cfg.chunk_rows}"
        )
    return cfg.chunk_rows


def vector_settings(cfg: EmbedConfig, encoders: Encoders) -> dict[str, Any]:
    """What besides the rows can change a vector's bits, for the chunk keys: the models and their
    widths, lengths and sizes, the batch sizes (they decide padding and kernels), the device, its
    autocast dtype and GPU, and torch's version. Not `num_workers` (the same vectors, tested) nor
    `chunk_rows` (a chunk's rows are in its key)."""
    import torch

    device = str(encoders.device)
    settings = {
        "format": CHUNK_FORMAT,
        "text_model": encoders.text.ref,
        "text_dim": int(encoders.text.dim),
        "text_max_length": cfg.text_max_length,
        "text_batch_size": cfg.text_batch_size,
        "image_model": encoders.image.ref,
        "image_dim": int(encoders.image.dim),
        "image_size": cfg.image_size,
        "image_batch_size": cfg.image_batch_size,
        "device": device,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "text_autocast": str(getattr(encoders.text, "half", None)),
        "image_autocast": str(getattr(encoders.image, "half", None)),
        "torch": torch.__version__,
    }
    if encoders.llm is not None:  # only then: the keys of chunks without the block are unchanged
        block = encoders.llm
        settings |= {
            "llm_model": block.encoder.ref,
            "llm_dim": block.dim,
            "llm_layer": block.variant.layer,
            "llm_pooling": block.variant.pooling,
            "llm_max_length": block.encoder.max_length,
            "llm_batch_size": block.encoder.batch_size,
        }
    return settings


def _file_size(path: str) -> int:
    """The image file's size (-1: no path or no file): a re-fetched image changes the key."""
    if not path:
        return -1
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def chunk_key(
    settings: Mapping[str, Any],
    split: str,
    ids: list[Any],
    texts: list[str],
    paths: list[str],
    has_image: np.ndarray,
    llm_in: list[str] | None = None,
) -> str:
    """sha256 over the settings, the split and the chunk's rows: ids, texts (preprocess options
    change them under the same ids), image paths, has_image and image file sizes, and the LLM
    block's template texts when it is on."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"settings": settings, "split": split}, sort_keys=True).encode())
    digest.update(row_hash(ids).encode())
    rows = [texts, paths, [bool(h) for h in has_image], [_file_size(p) for p in paths]]
    digest.update(json.dumps(rows).encode())
    if llm_in is not None:
        digest.update(json.dumps(llm_in).encode())
    return digest.hexdigest()


# (text, image, mask) or, with the LLM block, (text, image, mask, raw llm vectors)
Arrays = tuple[np.ndarray, ...]


def save_chunk(
    path: Path,
    key: str,
    text: np.ndarray,
    image: np.ndarray,
    mask: np.ndarray,
    llm: np.ndarray | None = None,
) -> None:
    """One finished chunk, atomically: a temp file beside `path`, synced, then one rename, so a
    kill leaves no file, the old one or the whole new one, never a half chunk under its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    extra = {} if llm is None else {"llm": llm}
    try:
        with open(tmp, "wb") as out:
            np.savez(out, key=np.array(key), text=text, image=image, mask=mask, **extra)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_chunk(
    path: Path, key: str, rows: int, dims: tuple[int, int], llm_dim: int | None = None
) -> Arrays | None:
    """(text, image, mask), and the raw llm vectors when `llm_dim` is given, of the finished
    chunk at `path`, or None when it is absent, unreadable, of another key or of another shape
    (then the chunk is computed again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            text, image, mask = stored["text"], stored["image"], stored["mask"]
            llm = stored["llm"] if llm_dim is not None else None
    except Exception:  # a torn or foreign file: recompute rather than crash
        return None
    if text.shape != (rows, dims[0]) or image.shape != (rows, dims[1]) or mask.shape != (rows,):
        return None
    if llm is None:
        return text, image, mask
    if llm.shape != (rows, llm_dim):
        return None
    return text, image, mask, llm


def clear_checkpoints(layout: Layout) -> None:
    """Delete embed's chunk files and temp files of killed writes, then the emptied folders."""
    directory = layout.embed_checkpoints
    for path in [*directory.glob("*.npz"), *directory.glob(".*.tmp-*")]:
        path.unlink(missing_ok=True)
    for folder in (directory, layout.checkpoints_dir):
        with contextlib.suppress(OSError):  # absent, or holding another stage's checkpoints
            folder.rmdir()


def embed_chunk(
    texts: list[str], paths: list[str], encoders: Encoders, llm_in: list[str] | None = None
) -> tuple[Arrays, dict[str, float]]:
    """((text_emb, image_emb, image_mask), timings) of one chunk's rows, in their order; with the
    LLM block the raw (unstandardised) vectors of `llm_in` (the rows' `llm_texts`) come fourth.

    A row whose image cannot be read gets a zero vector and mask False, so a consumer can tell
    "no image" from "an image that embeds to zeros".
    """
    start = time.perf_counter()
    text_emb = encoders.text.encode(texts, progress=True)
    text_seconds = time.perf_counter() - start
    start = time.perf_counter()
    image_emb, image_mask = encoders.image.encode_paths(paths, progress=True)
    image_seconds = time.perf_counter() - start
    timings = {
        "texts": float(len(texts)),
        "text_seconds": text_seconds,
        "images": float(sum(1 for p in paths if p)),
        "image_seconds": image_seconds,
    }
    arrays: Arrays = (text_emb, image_emb, image_mask)
    if encoders.llm is not None:
        if llm_in is None or len(llm_in) != len(texts):
            raise ValueError("the LLM block needs one template text per row of the chunk")
        start = time.perf_counter()
        (llm_emb,) = encoders.llm.encoder.encode(llm_in, [encoders.llm.variant], progress=True)
        timings |= {"llm_texts": float(len(llm_in)), "llm_seconds": time.perf_counter() - start}
        arrays = (*arrays, llm_emb)
    return arrays, timings


@dataclass
class SplitEmbedding:
    """One split's arrays in table order, the encoding timings of the chunks computed in this run
    and how many chunks were computed or taken over from a killed run's checkpoints."""

    text: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    timings: dict[str, float]
    computed: int
    reused: int
    llm: np.ndarray | None = None  # the LLM block's raw vectors (None: the block is off)


def embed_split(
    split: str,
    table: pd.DataFrame,
    encoders: Encoders,
    layout: Layout,
    settings: Mapping[str, Any],
    chunk_rows: int,
) -> SplitEmbedding:
    """Encode one parsed table chunk by chunk (`chunk_rows` rows), taking over the finished chunks
    whose key matches and checkpointing every chunk it computes."""
    n = len(table)
    ids = table[ID].tolist()
    texts = table[TEXT].fillna("").astype(str).tolist()
    has_image = table[HAS_IMAGE].fillna(False).astype(bool).to_numpy()
    paths = table[IMAGE_PATH].fillna("").astype(str).where(has_image, "").tolist()
    dims = (int(encoders.text.dim), int(encoders.image.dim))
    text_emb = np.zeros((n, dims[0]), dtype=np.float32)
    image_emb = np.zeros((n, dims[1]), dtype=np.float32)
    mask = np.zeros(n, dtype=bool)
    llm_in = llm_texts(table) if encoders.llm is not None else None
    llm_dim = encoders.llm.dim if encoders.llm is not None else None
    llm_emb = np.zeros((n, llm_dim), dtype=np.float32) if llm_dim is not None else None
    todo: list[tuple[int, int, int, str]] = []
    for index, start in enumerate(range(0, n, chunk_rows)):
        stop = min(start + chunk_rows, n)
        rows = slice(start, stop)
        chunk_llm = llm_in[rows] if llm_in is not None else None
        key = chunk_key(
            settings, split, ids[rows], texts[rows], paths[rows], has_image[rows], chunk_llm
        )
        stored = load_chunk(layout.embed_chunk(split, index), key, stop - start, dims, llm_dim)
        if stored is None:
            todo.append((index, start, stop, key))
        else:
            text_emb[rows], image_emb[rows], mask[rows] = stored[:3]
            if llm_emb is not None:
                llm_emb[rows] = stored[3]
    n_chunks = -(-n // chunk_rows)
    timings = dict.fromkeys(TIMINGS, 0.0)
    done = n - sum(stop - start for _, start, stop, _ in todo)
    with tqdm(total=n, initial=done, unit="row", desc=f"embed {split}", disable=None) as bar:
        for index, start, stop, key in todo:
            rows = slice(start, stop)
            bar.set_postfix_str(f"chunk {index + 1}/{n_chunks}")
            chunk_llm = llm_in[rows] if llm_in is not None else None
            arrays, chunk_timings = embed_chunk(texts[rows], paths[rows], encoders, chunk_llm)
            save_chunk(layout.embed_chunk(split, index), key, *arrays)
            text_emb[rows], image_emb[rows], mask[rows] = arrays[:3]
            if llm_emb is not None:
                llm_emb[rows] = arrays[3]
            for name, value in chunk_timings.items():
                timings[name] += value
            bar.update(stop - start)
    return SplitEmbedding(
        text_emb,
        image_emb,
        mask,
        timings,
        computed=len(todo),
        reused=n_chunks - len(todo),
        llm=llm_emb,
    )


def write_llm_block(raw: Mapping[str, np.ndarray], block: LlmBlock, layout: Layout) -> dict:
    """Fit the Standardiser on the train split's raw vectors, write every split standardised
    (`layout.llm_embeddings`), the standardiser's arrays and `llm.json`; return the block's facts
    for meta.json."""
    if "train" not in raw:
        raise StageError("the LLM block is standardised on the train rows: no train split given")
    try:
        standardiser = Standardiser.fit(raw["train"])
    except ValueError as exc:
        raise StageError(f"embed.llm: {exc}") from exc
    for split, vectors in raw.items():
        np.save(layout.llm_embeddings(split), standardiser.transform(vectors))
    standardiser.save(layout.features_dir)
    facts = {
        "llm_model": block.encoder.ref,
        "llm_dim": block.dim,
        "llm_layer": block.variant.layer,
        "llm_pooling": block.variant.pooling,
        "llm_max_length": block.encoder.max_length,
    }
    write_block_meta(layout.features_dir, facts)
    return facts


def remove_llm_block(layout: Layout) -> None:
    """Delete the LLM block's files a run with the block on left (consumers read the block when
    its file exists, so a stale one must not outlive a run that turned it off)."""
    for split in SPLITS:
        layout.llm_embeddings(split).unlink(missing_ok=True)
    for path in layout.llm_block_files():
        path.unlink(missing_ok=True)


def embed_tables(
    tables: dict[str, pd.DataFrame], encoders: Encoders, layout: Layout, cfg: EmbedConfig
) -> StageRecord:
    """Encode every split in checkpointed chunks (resuming a killed run's finished ones), write
    its arrays under `layout.features_dir`, delete the checkpoints, and return what the stage
    records: coverage, throughput and chunk metrics, the encoders (tags, params), the row hashes."""
    chunk_rows = check_chunk_rows(cfg)
    settings = vector_settings(cfg, encoders)
    layout.features_dir.mkdir(parents=True, exist_ok=True)
    totals = dict.fromkeys(TIMINGS, 0.0)
    metrics: dict[str, float] = {"chunks_computed": 0.0, "chunks_reused": 0.0}
    hashes: dict[str, str] = {}
    llm_raw: dict[str, np.ndarray] = {}
    for split, table in tables.items():
        done = embed_split(split, table, encoders, layout, settings, chunk_rows)
        np.save(layout.text_embeddings(split), done.text)
        np.save(layout.image_embeddings(split), done.image)
        np.save(layout.image_mask(split), done.mask)
        if done.llm is not None:
            llm_raw[split] = done.llm
        hashes[f"row_hash_{split}"] = row_hash(table[ID].tolist())
        for key in totals:
            totals[key] += done.timings[key]
        has_image = table[HAS_IMAGE].fillna(False).astype(bool).to_numpy()
        metrics[f"rows_{split}"] = float(len(table))
        metrics[f"image_coverage_{split}"] = float(done.mask.mean()) if len(table) else 0.0
        metrics[f"images_failed_{split}"] = float((has_image & ~done.mask).sum())
        metrics["chunks_computed"] += done.computed
        metrics["chunks_reused"] += done.reused
    block = encoders.llm
    llm_facts: dict[str, Any] = {}
    if block is not None:
        llm_facts = write_llm_block(llm_raw, block, layout)
        metrics["llm_load_seconds"] = block.load_seconds
        if totals["llm_texts"]:
            rate = totals["llm_texts"] / max(totals["llm_seconds"], 1e-9)
            metrics["llm_texts_per_second"] = rate
        llm_facts |= {k: v for k, v in metrics.items() if k.startswith("llm_")}
    else:
        remove_llm_block(layout)
    # Every split's arrays are written: the checkpoints have served (DVC deletes the outputs
    # before a run, so a split's chunks are kept until the last split is done).
    clear_checkpoints(layout)
    if totals["texts"]:
        metrics["texts_per_s"] = totals["texts"] / max(totals["text_seconds"], 1e-9)
    if totals["images"]:
        metrics["images_per_s"] = totals["images"] / max(totals["image_seconds"], 1e-9)

    text, image = encoders.text, encoders.image
    coverage = ", ".join(
        f"{split} {len(table)} rows ({metrics[f'image_coverage_{split}']:.0%} with image)"
        for split, table in tables.items()
    )
    speed = f"{metrics['texts_per_s']:.0f} texts/s" if "texts_per_s" in metrics else "no text"
    if "images_per_s" in metrics:
        speed += f", {metrics['images_per_s']:.1f} images/s"
    llm_part = ""
    if block is not None:
        rate = metrics.get("llm_texts_per_second")
        llm_part = (
            f"; LLM block {block.dim}-d ({block.variant.label}, loaded in "
            f"{block.load_seconds:.0f}s" + (f", {rate:.1f} texts/s)" if rate else ")")
        )
    where = f"{encoders.threads} thread(s)" if encoders.device == "cpu" else encoders.device
    chunks = (
        f"{metrics['chunks_computed']:.0f} chunk(s) of up to {chunk_rows} rows computed, "
        f"{metrics['chunks_reused']:.0f} resumed from {layout.embed_checkpoints}"
    )
    return StageRecord(
        summary=(
            f"embed: {coverage}; text {text.dim}-d, image {image.dim}-d; {speed} encoded on "
            f"{where}{llm_part}; {chunks} -> {layout.features_dir}"
        ),
        metrics=metrics,
        tags={"text_model": text.ref, "image_model": image.ref}
        | ({"llm_model": block.encoder.ref} if block is not None else {}),
        params={"text_dim": text.dim, "image_dim": image.dim, "torch_threads": encoders.threads}
        | ({"llm_dim": block.dim} if block is not None else {}),
        meta={
            layout.features_dir: {
                "text_model": text.ref,
                "text_dim": text.dim,
                "image_model": image.ref,
                "image_dim": image.dim,
                **hashes,
                **llm_facts,
            }
        },
        # Logged after `tracking.record` writes it, so the run holds the meta.json it wrote.
        artifacts={"": [layout.features_dir / "meta.json"]},
    )
