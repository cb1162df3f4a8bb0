"""`train_text` as two data-parallel CPU processes (torchrun + accelerate, gloo) writes the same
kind of outputs as one process, and logs one MLflow run, not one per process.

Why torchrun and not `accelerate launch`: on CPU, accelerate's launcher runs several processes
only through MPI, and its CLI imports timm -> torchvision, which fails on the CPU torch wheel
(pricefuse.core.compat patches that for pricefuse's own imports only). torchrun sets the environment
accelerate's `Accelerator` reads (RANK, WORLD_SIZE, ...), on CPU or GPU alike.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.support import PARAMS_YAML, deep_update, run_cmd, text_rows, tiny_encoder

pytestmark = pytest.mark.integration


def _project(root: Path, ref: str) -> Path:
    root.mkdir(parents=True)
    params = yaml.safe_load(PARAMS_YAML.read_text())
    deep_update(
        params,
        {
            "ensemble": {"members": ["linear", "text"]},
            "text": {
                "model": ref,
                "max_length": 24,
                "batch_size": 4,
                "epochs": 2,
                "smape_epochs": 1,
                "frozen_epochs": 1,
                "grad_accum": 2,
                "refit": False,
                "export_embeddings": True,
            },
        },
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    interim = root / params["data"]["interim_dir"]
    interim.mkdir(parents=True)
    text_rows(30, 0, n_folds=3).to_parquet(interim / "train.parquet")
    text_rows(7, 1, train=False).to_parquet(interim / "test.parquet")
    return root


def _outputs(root: Path) -> dict:
    model_dir = root / "data/models/text"
    con = sqlite3.connect(root / "mlflow.db")
    runs = list(con.execute("select name, status from runs"))
    con.close()
    return {
        "files": sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")),
        "oof": pd.read_parquet(model_dir / "oof.parquet"),
        "test": pd.read_parquet(model_dir / "test.parquet"),
        "meta": json.loads((model_dir / "meta.json").read_text()),
        "embeddings": np.load(root / "data/models/text_embeddings/train.npy"),
        "plots": sorted(p.name for p in (root / "plots/train_text").iterdir()),
        "runs": runs,
    }


def test_two_processes_write_what_one_process_writes(tmp_path: Path) -> None:
    ref = tiny_encoder(tmp_path / "tiny-bert")
    one = _project(tmp_path / "one", ref)
    two = _project(tmp_path / "two", ref)

    run_cmd(["python", "-m", "pricefuse.cli", "train-text"], one, timeout=600)
    result = run_cmd(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "pricefuse.cli", "train-text"],
        two,
        timeout=600,
    )
    assert "on 2 process(es)" in result.stdout

    single, double = _outputs(one), _outputs(two)
    assert single["files"] == double["files"]
    assert {"fold_0.pt", "fold_1.pt", "fold_2.pt", "text.json", "oof.parquet"} <= set(
        single["files"]
    )
    for key in ("oof", "test"):
        assert list(single[key].columns) == list(double[key].columns)
        assert single[key]["sample_id"].tolist() == double[key]["sample_id"].tolist()
        assert np.isfinite(double[key]["text"]).all()
    assert single["embeddings"].shape == double["embeddings"].shape
    assert single["plots"] == double["plots"] and "learning_curves.csv" in double["plots"]
    assert (single["meta"]["num_processes"], double["meta"]["num_processes"]) == (1, 2)
    assert single["runs"] == double["runs"] == [("train_text", "FINISHED")]
    # rerun with 2 processes: every fold resumes from the checkpoints
    result = run_cmd(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "pricefuse.cli", "train-text"],
        two,
        timeout=600,
    )
    assert "resumed fold_0, fold_1, fold_2" in result.stdout
