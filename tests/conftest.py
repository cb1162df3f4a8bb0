"""Shared fixtures: every test gets its own MLflow store, never the repo's mlflow.db."""

from __future__ import annotations

import os
from pathlib import Path

# Before any test module imports sklearn or a booster: libgomp reads it once, at load time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
from hypothesis import settings

from tests.support import copy_project, tiny_joint_model

# Property-based tests run the same examples on every machine (a CI failure reproduces locally)
# and keep no example database: tests write nothing into the checkout.
settings.register_profile("pricefuse", derandomize=True, database=None, deadline=None)
settings.load_profile("pricefuse")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "amazon2025"
TESTS_DIR = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "real", "team")  # one directory under tests/ each, one marker each


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: it selects on these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier, from its directory, so none can go without one.

    A test outside tests/{unit,integration,real}, or carrying another tier's marker by hand,
    stops the run before anything runs.
    """
    problems = []
    for item in items:
        path = Path(item.path).resolve()
        parts = path.relative_to(TESTS_DIR).parts if path.is_relative_to(TESTS_DIR) else ()
        tier = parts[0] if len(parts) > 1 and parts[0] in TIERS else None
        if tier is None:
            problems.append(f"{item.nodeid}: not in tests/{{{','.join(TIERS)}}}/")
            continue
        others = {m.name for m in item.iter_markers() if m.name in TIERS} - {tier}
        if others:
            problems.append(f"{item.nodeid}: marked {', '.join(sorted(others))} in tests/{tier}/")
        item.add_marker(getattr(pytest.mark, tier))
    if problems:
        raise pytest.UsageError(
            "every test belongs to exactly one tier, given by its directory "
            f"(tests/{{{','.join(TIERS)}}}):\n  " + "\n  ".join(problems)
        )


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


@pytest.fixture(scope="session")
def make_project(tmp_path_factory: pytest.TempPathFactory):
    """Copy the project (code, pipeline, params) into a fresh git+DVC repo in a temp dir.

    The copy uses the installed pricefuse package; `overrides` are merged into its params.yaml.
    """

    def factory(name: str, overrides: dict) -> Path:
        return copy_project(tmp_path_factory.mktemp(name), overrides)

    return factory


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random CLIP directory (tests.support.tiny_joint_model), built once per session."""
    return tiny_joint_model(tmp_path_factory.mktemp("tiny-clip"), "clip")


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random SigLIP directory (tests.support.tiny_joint_model), built once per session."""
    return tiny_joint_model(tmp_path_factory.mktemp("tiny-siglip"), "siglip")


@pytest.fixture
def one_torch_thread():
    """Tiny models: one torch thread is as fast and immune to the other processes on a shared
    box (use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
