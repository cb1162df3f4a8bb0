"""embed's checkpointed chunks: a run killed with SIGKILL resumes at the first unfinished chunk and
writes the same bytes as an uninterrupted run; a chunk is taken over only when its key matches.

The encoders are stand-ins that batch like the real ones (the text one sorts what it is given by
length; the image one numbers the readable images of a call), so their vectors depend on which
rows share a call, as padding and kernels make real vectors do: equal arrays mean equal chunks.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pricefuse.core.errors import StageError
from pricefuse.core.layout import Layout
from pricefuse.features.embedding import (
    Encoders,
    clear_checkpoints,
    embed_split,
    embed_tables,
    load_embed_inputs,
    load_encoders,
    vector_settings,
)
from pricefuse.recording import tracking
from tests.support import REPO_ROOT, project_params

N_TRAIN, N_TEST, CHUNK_ROWS = 50, 23, 20  # train chunks of 20, 20, 10 rows; test 20, 3
BLOCKED = "blocked"  # the killed child's stand-in writes this file, then waits to be killed


class BatchText:
    """Stands in for TextEncoder: texts sorted by length (longest first) over the whole call, 4 per
    batch; a vector is (length, the batch's longest length, batch number). `block_at`: the call
    that announces itself (file BLOCKED) and sleeps until it is killed."""

    ref, dim = "stand-in:text", 3

    def __init__(self, block_at: int | None = None) -> None:
        self.calls: list[int] = []
        self.block_at = block_at

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        self.calls.append(len(texts))
        if len(self.calls) == self.block_at:
            Path(BLOCKED).touch()
            time.sleep(600)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for batch, start in enumerate(range(0, len(order), 4)):
            index = order[start : start + 4]
            longest = max(len(texts[i]) for i in index)
            out[index] = [[len(texts[i]), longest, batch] for i in index]
        return out


class BatchImage:
    """Stands in for ImageEncoder: (file size, rank among the call's readable images); zeros and
    mask False for "" or a missing file."""

    ref, dim = "stand-in:image", 2

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode_paths(self, paths: list[str], progress: bool = False):
        self.calls.append(len(paths))
        mask = np.array([bool(p) and Path(p).is_file() for p in paths], dtype=bool)
        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        for rank, i in enumerate(np.flatnonzero(mask)):
            out[i] = [Path(paths[i]).stat().st_size, rank]
        return out, mask


def _tables() -> dict[str, pd.DataFrame]:
    """Parsed rows of two splits: texts of many lengths, every third row with an image (file
    `i // 10 % 5`; a missing file where i is a multiple of 7), ids as preprocess writes them."""
    tables = {}
    for split, n, offset in (("train", N_TRAIN, 0), ("test", N_TEST, 10_000)):
        rows = np.arange(n)
        has_image = rows % 3 == 0
        paths = [
            (f"data/images/{i // 10 % 5}.jpg" if i % 7 else "data/images/missing.jpg") if h else ""
            for i, h in zip(rows, has_image, strict=True)
        ]
        tables[split] = pd.DataFrame(
            {
                "sample_id": rows + offset,
                "text": [f"product {i} " + "word " * ((i * 7) % 11) for i in rows],
                "image_path": paths,
                "has_image": has_image,
            }
        )
    return tables


def _params(**embed: object):
    return project_params(embed={"chunk_rows": CHUNK_ROWS, **embed})


def _make_project(root: Path) -> Path:
    """A project folder with the parsed tables and five small image files of different sizes."""
    (root / "data/images").mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (20 + 10 * i, 30), (40 * i, 90, 200)).save(root / f"data/images/{i}.jpg")
    layout = Layout(_params().data)
    (root / layout.interim_dir).mkdir(parents=True)
    for split, table in _tables().items():
        table.to_parquet(root / layout.parsed(split))
    tracking.write_meta(root / layout.interim_dir, "preprocess", "preprocess-run")
    return root


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = _make_project(tmp_path / "project")
    monkeypatch.chdir(root)
    return root


def _run(text: BatchText | None = None, image: BatchImage | None = None, **embed: object):
    params = _params(**embed)
    layout = Layout(params.data)
    encoders = Encoders(text or BatchText(), image or BatchImage(), threads=1)
    return embed_tables(load_embed_inputs(layout), encoders, layout, params.embed)


def _outputs(root: Path) -> dict[str, bytes]:
    layout = Layout(_params().data)
    files = [
        path(split)
        for split in ("train", "test")
        for path in (layout.text_embeddings, layout.image_embeddings, layout.image_mask)
    ]
    return {str(f): (root / f).read_bytes() for f in files}


# The killed run: the package and these stand-ins, imported from the checkout, in the project.
CHILD = f"""
import sys
sys.path[:0] = [{str(REPO_ROOT)!r}, {str(Path(__file__).parent)!r}]
import test_embed_checkpoints as t
t._run(t.BatchText(block_at=3))
"""


def test_killed_run_resumes_without_recomputing_and_writes_the_same_bytes(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(_params().data)
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=project, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while not (project / BLOCKED).exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            assert time.monotonic() < deadline, "the child never reached its third chunk"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)  # in its third chunk's text encoding
    finally:
        child.kill()
        child.wait()
        log.close()
    assert child.returncode == -signal.SIGKILL
    chunks = sorted(p.name for p in layout.embed_checkpoints.iterdir())
    assert chunks == ["train_00000.npz", "train_00001.npz"]

    shutil.rmtree(layout.features_dir)  # as `dvc repro` does before running the stage
    text, image = BatchText(), BatchImage()
    resumed = _run(text, image)
    assert resumed.metrics["chunks_reused"] == 2 and resumed.metrics["chunks_computed"] == 3
    assert text.calls == image.calls == [10, 20, 3]  # train's last chunk, then both of test's
    assert "3 chunk(s) of up to 20 rows computed, 2 resumed" in resumed.summary
    assert not layout.checkpoints_dir.exists()  # deleted once every split is written

    fresh = _make_project(tmp_path / "fresh")
    monkeypatch.chdir(fresh)
    uninterrupted = _run()
    assert uninterrupted.metrics["chunks_reused"] == 0
    assert uninterrupted.metrics["chunks_computed"] == 5
    assert _outputs(project) == _outputs(fresh)
    for split in ("train", "test"):
        for path in (layout.text_embeddings, layout.image_embeddings, layout.image_mask):
            assert np.array_equal(np.load(project / path(split)), np.load(fresh / path(split)))
    assert uninterrupted.meta == resumed.meta


def test_a_chunk_is_reused_only_when_its_key_matches(project: Path) -> None:
    params = _params()
    layout = Layout(params.data)
    table = load_embed_inputs(layout)["train"]

    def run(table: pd.DataFrame, **embed: object) -> tuple[BatchText, object]:
        cfg = dataclasses.replace(params.embed, **embed)
        text = BatchText()
        encoders = Encoders(text, BatchImage(), threads=1)
        done = embed_split("train", table, encoders, layout, vector_settings(cfg, encoders), 20)
        return text, done

    first, done = run(table)
    assert first.calls == [20, 20, 10] and (done.computed, done.reused) == (3, 0)
    again, done = run(table)
    assert again.calls == [] and (done.computed, done.reused) == (0, 3)

    edited = table.copy()
    edited.loc[25, "text"] = "a new text for a row of the second chunk"
    text, done = run(edited)
    assert text.calls == [20] and (done.computed, done.reused) == (1, 2)
    assert done.text[25, 0] == len(edited.loc[25, "text"])

    refetched = project / "data/images/1.jpg"  # rows 12, 15, 18: chunk 0
    Image.new("RGB", (90, 90)).save(refetched)
    text, done = run(edited)
    assert text.calls == [20] and done.image[12, 0] == refetched.stat().st_size

    layout.embed_chunk("train", 2).write_bytes(b"PK\x03\x04 a torn write")
    stale_tmp = layout.embed_checkpoints / ".train_00001.npz.tmp-99999"
    stale_tmp.write_bytes(b"half")
    text, done = run(edited)
    assert text.calls == [10] and (done.computed, done.reused) == (1, 2)

    text, done = run(edited, num_workers=0)  # a setting that does not change vectors
    assert text.calls == []
    text, done = run(edited, text_max_length=64)  # one that does: every chunk again
    assert text.calls == [20, 20, 10]
    text, done = run(edited.assign(has_image=False), text_max_length=64)
    assert text.calls == [20, 20, 10]  # has_image (and so the paths read) is in the key

    clear_checkpoints(layout)
    assert not layout.checkpoints_dir.exists()


def test_chunk_rows_is_validated_before_any_model_loads(project: Path) -> None:
    for value in (0, -5):
        with pytest.raises(StageError, match=r"embed\.chunk_rows must be >= 1"):
            _run(chunk_rows=value)
        with pytest.raises(StageError, match=r"embed\.chunk_rows must be >= 1"):
            load_encoders(dataclasses.replace(_params().embed, chunk_rows=value))
    assert not Layout(_params().data).features_dir.exists()


def test_one_chunk_is_the_whole_split_and_the_default_keeps_demo_splits_whole(
    project: Path,
) -> None:
    layout = Layout(_params().data)
    text = BatchText()
    result = _run(text, chunk_rows=N_TRAIN)
    assert text.calls == [N_TRAIN, N_TEST]
    assert result.metrics["chunks_computed"] == 2
    whole = np.load(layout.text_embeddings("train"))
    _run()
    # Other chunks, other batches, other vectors: why every run, resumed or not, chunks alike.
    assert not np.array_equal(whole, np.load(layout.text_embeddings("train")))
    defaults = project_params()
    # Chunking changes batches, so the default must leave the demo and the real sample
    # (~8,600 train rows) one chunk per split, as they were embedded before chunks existed.
    assert defaults.embed.chunk_rows >= max(defaults.demo.n_train, defaults.demo.n_test, 8_600)
