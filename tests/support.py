"""Helpers shared by the tests: the project's params, project copies, commands."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from pricefuse.config import Params, load_raw, params_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO_ROOT / "params.yaml"

PROJECT_FILES = (
    "dvc.yaml",
    "params.yaml",
    "MLproject",
    "python_env.yaml",
    "requirements.lock",
    "requirements.txt",
    "pyproject.toml",
    "README.md",
)


def deep_update(tree: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            deep_update(tree[key], value)
        else:
            tree[key] = value
    return tree


@functools.cache
def _project_tree() -> dict[str, Any]:
    return load_raw(PARAMS_YAML)


def project_params(**sections: Any) -> Params:
    """The repository's params.yaml with `sections` merged in (nested mappings key by key).

    Why: every test config starts from the real file, so a value lives in one place and a test
    states only what it needs differently; the result is validated and typed like the file
    itself. E.g. `project_params(gbdt={"n_estimators": 40}, seed=5)`. For one section with a few
    changes, `dataclasses.replace(project_params().fetch, max_side=0)`.
    """
    tree = copy.deepcopy(_project_tree())
    return params_from_dict(deep_update(tree, copy.deepcopy(sections)), source=str(PARAMS_YAML))


def run_cmd(args: list[str], cwd: Path, timeout: float = 900, check: bool = True, env=None):
    """Run a command in a project copy, echoing its output when it fails."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    # A project copy uses its own store: sqlite:///mlflow.db at its root (the documented default).
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
    result = subprocess.run(
        args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result
