"""Shared fixtures: every test gets its own MLflow store, never the repo's mlflow.db."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "amazon2025"


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    store = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield


@pytest.fixture
def shared_data() -> Path:
    """The real competition rows, or a skip saying why they are absent."""
    if not (SHARED_DATA / "train.csv").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (see its README)")
    return SHARED_DATA
