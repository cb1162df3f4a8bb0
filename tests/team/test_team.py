"""Two teammates, one tracking server on a real PostgreSQL, one DVC remote.

Clone A runs the demo pipeline against the server and pushes its outputs (and DVC's run cache)
to the remote; clone B is a `git clone` of A that pulls and finds nothing to recompute, the
registry on the server serves B, and a server killed in the middle of a stage costs that stage
a clear error and a re-run, nothing more. The tests run in order on one setup, each asserting on
the state the previous one left (the pipeline run is the expensive part).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from pricefuse.cli import STAGES
from tests.support import REPO_ROOT, copy_project, model_server, run_cmd
from tests.team.servers import PostgresCluster, TrackingServer

# Smaller than the integration tier's TINY: the point is who computes what, not the models.
TEAM = {
    "demo": {"n_train": 120, "n_test": 24, "image_size": 48},
    "preprocess": {"n_folds": 2},
    "embed": {"text_max_length": 32},
    "fusion": {"epochs": 4, "patience": 2},
    "gbdt": {"boosters": ["lightgbm"], "n_estimators": 30, "text_pca": 4, "image_pca": 2},
    "neighbours": {"k": 5},
    "linear": {"char_max_features": 5000},
    "ablation": {"fusion_variants": ["all"]},
    "ensemble": {"members": ["fusion", "lightgbm", "linear", "knn"], "stackers": ["ridge"]},
}
MODEL = "price-ensemble"


@dataclass
class Team:
    server: TrackingServer
    remote: Path
    clone_a: Path
    clone_b: Path

    @property
    def env(self) -> dict[str, str]:
        """What each teammate sets (MLFLOW_TRACKING_URI), plus short client retries so a dead
        server is reported in seconds rather than MLflow's minutes of back-off."""
        return {
            "MLFLOW_TRACKING_URI": self.server.uri,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        }

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.server.uri, registry_uri=self.server.uri)

    def run_ids(self) -> set[str]:
        client = self.client()
        experiment = client.get_experiment_by_name("pricefuse")
        runs = client.search_runs([experiment.experiment_id], max_results=5000)
        return {run.info.run_id for run in runs}


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("team")
    cluster = PostgresCluster()
    cluster.start()
    server = TrackingServer(cluster.url, base / "artifacts", base / "tracking-server.log")
    try:
        server.start()
        yield Team(server, base / "dvc-remote", base / "clone-a", base / "clone-b")
    finally:
        server.kill()
        cluster.stop()


def _meta_run_id(root: Path, out_dir: str) -> str:
    return json.loads((root / out_dir / "meta.json").read_text())["run_id"]


def test_clone_a_runs_against_the_server_and_pushes(team: Team):
    root = copy_project(team.clone_a, TEAM)
    shutil.copy2(REPO_ROOT / ".dvc" / "config", root / ".dvc" / "config")  # the shipped remote
    # The one line a team changes (docs/team.md); here a local directory.
    run_cmd(["dvc", "remote", "modify", "team", "url", str(team.remote)], root)
    run_cmd(["pricefuse", "demo-data"], root)
    run_cmd(["dvc", "add", "data/raw/demo"], root)  # raw data reaches teammates by the remote
    result = run_cmd(["dvc", "repro"], root, env=team.env, timeout=1200)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout, stage
    assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()
    # dvc.lock, metrics/ and plots/ (cache: false) travel by git, the rest by the remote.
    run_cmd(["git", "add", "-A"], root)
    run_cmd(["git", "commit", "-qm", "demo pipeline run"], root)
    tracked = run_cmd(["git", "ls-files"], root).stdout.split()
    assert {"dvc.lock", "data/raw/demo.dvc", "metrics/ensemble.json"} <= set(tracked)
    run_cmd(["dvc", "push", "--run-cache"], root)
    assert any(team.remote.rglob("*")), "nothing reached the remote"


def test_clone_b_pulls_and_recomputes_nothing(team: Team):
    root = team.clone_b
    run_cmd(["git", "clone", "-q", str(team.clone_a), str(root)], team.clone_a.parent)
    pulled = run_cmd(["dvc", "pull", "--run-cache"], root, env=team.env)
    assert (root / "data/raw/demo/train.csv").exists(), pulled.stdout
    runs_before = team.run_ids()
    result = run_cmd(["dvc", "repro"], root, env=team.env)
    assert "Running stage" not in result.stdout, result.stdout
    assert "Data and pipelines are up to date" in run_cmd(["dvc", "status"], root).stdout
    assert team.run_ids() == runs_before, "a stage logged a run although nothing changed"
    # Lineage came with the pulled outputs: each names the server's run that wrote it, and
    # the ensemble run tags the runs whose outputs it consumed.
    client = team.client()
    ensemble = client.get_run(_meta_run_id(root, "data/models/ensemble"))
    assert ensemble.data.tags["stage"] == "ensemble"
    fusion_run = _meta_run_id(root, "data/models/fusion")
    assert ensemble.data.tags["upstream.train_fusion"] == fusion_run
    assert client.get_run(fusion_run).info.status == "FINISHED"


def _post(base: str, frame: pd.DataFrame) -> dict:
    body = json.dumps({"dataframe_split": frame.to_dict(orient="split")}).encode()
    request = urllib.request.Request(
        f"{base}/invocations",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_registry_on_the_server_serves_clone_b(team: Team):
    version = team.client().get_model_version(MODEL, "1")
    assert version.status == "READY"
    assert version.run_id == _meta_run_id(team.clone_b, "data/models/ensemble")
    log_path = team.clone_b.parent / "clone_b_serve.log"
    with model_server(f"models:/{MODEL}/1", team.clone_b, log_path, env=team.env) as base:
        test = pd.read_csv(team.clone_b / "data/raw/demo/test.csv").head(3)
        served = pd.DataFrame(_post(base, test[["sample_id", "catalog_content"]])["predictions"])
        assert list(served["sample_id"]) == list(test["sample_id"])
        assert (served["price"] > 0).all()


def _wait_for_running(team: Team, stage: str, process: subprocess.Popen) -> None:
    """Until the stage's run exists on the server, unfinished."""
    client = team.client()
    experiment = client.get_experiment_by_name("pricefuse")
    query = f"attributes.run_name = '{stage}' and attributes.status = 'RUNNING'"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{stage} ended before its run was seen: {process.communicate()}")
        if client.search_runs([experiment.experiment_id], query):
            return
        time.sleep(0.2)
    raise AssertionError(f"no running {stage} run on the server within 180 s")


def test_server_killed_mid_stage_fails_clearly_and_rerun_completes(team: Team):
    root = team.clone_b
    runs_before = team.run_ids()
    versions_before = {v.version for v in team.client().search_model_versions(f"name='{MODEL}'")}
    env = {**os.environ, **team.env}
    stage = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "train_fusion"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_running(team, "train_fusion", stage)
        team.server.kill()
        out, err = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode != 0, f"the stage finished before the server was killed:\n{out}"
    assert f"error: train_fusion: the MLflow tracking server (tracking URI {team.server.uri})" in (
        err
    ), err[-4000:]

    team.server.start()  # same database, same artifact store, same port
    result = run_cmd(["dvc", "repro"], root, env=team.env, timeout=900)
    ran = [s for s in STAGES if f"Running stage '{s}'" in result.stdout]
    assert "train_fusion" in ran and "ensemble" in ran, ran
    assert "Data and pipelines are up to date" in run_cmd(["dvc", "status"], root).stdout
    # Nothing lost: every earlier run and model version is still there, plus the new ones.
    assert runs_before < team.run_ids()
    client = team.client()
    versions = {v.version: v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert versions_before < set(versions)
    assert all(v.status == "READY" for v in versions.values())
    newest = max(versions, key=int)
    assert versions[newest].run_id == _meta_run_id(root, "data/models/ensemble")
