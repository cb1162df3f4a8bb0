"""Helpers shared by the integration and real-data tests."""

from __future__ import annotations

from pathlib import Path

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
