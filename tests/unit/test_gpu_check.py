"""benchmarks/gpu_check.py at toy size on whatever this machine has: every path runs, passes its
check, and the JSON and the table say so (the torchrun path may say it was skipped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PATHS = {
    "embed_text",
    "embed_image",
    "fusion",
    "xgboost",
    "catboost",
    "text_minilm",
    "text_deberta",
    "text_gemma_lora",
    "torchrun_2proc",
}
KEYS = {"path", "device", "rows", "seconds", "rows_per_s", "peak_gpu_mib", "check", "ok"}


def test_toy_gpu_check_runs_every_path_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--size", "toy", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    results = json.loads(out.read_text())
    assert {r["path"] for r in results} == PATHS
    for r in results:
        assert set(r) == KEYS
        assert r["ok"] is True, r
        if r["path"] == "torchrun_2proc" and r["check"].startswith("skipped"):
            continue
        assert r["rows"] > 0 and r["seconds"] > 0 and r["rows_per_s"] > 0, r
        assert "FAILED" not in r["check"]
    assert "total wall time:" in done.stdout
    for name in PATHS:
        assert name in done.stdout  # the table
