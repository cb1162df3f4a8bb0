"""The environment is described once (requirements.lock); the other files derive from it."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _lock() -> list[str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_lock_pins_cpu_torch_and_no_cuda():
    lock = _lock()
    assert all("==" in line for line in lock), "every lock line is an exact pin"
    assert "torch==2.13.0+cpu" in lock
    assert "mlflow==3.17.2" in lock
    assert not [line for line in lock if line.startswith(("nvidia", "cuda", "triton"))]
    assert any(line.startswith("xgboost-cpu==") for line in lock)


def test_python_env_names_exact_python_and_the_lock():
    env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    assert env["python"] == "3.11.7"
    assert "-r requirements.lock" in env["dependencies"]


def test_conda_env_is_generated_from_the_lock():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    assert "python=3.11.7" in conda["dependencies"]
    pip_section = next(d for d in conda["dependencies"] if isinstance(d, dict))["pip"]
    assert [p for p in pip_section if p != "-e ."] == _lock()


def test_every_direct_requirement_is_locked():
    locked = {line.split("==")[0].lower().replace("_", "-") for line in _lock()}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        # A requirement's name, without its extras (`psycopg[binary]`) and pin.
        name = line.split("#")[0].strip().split("[")[0].split("==")[0].lower().replace("_", "-")
        if name:
            assert name in locked, f"{name} is in requirements.txt but not in requirements.lock"


def test_pre_commit_hooks_run_locked_tools_and_the_deps_check():
    """`make hooks` / `make check`: local hooks whose tools come from the lock (no download)."""
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    assert {"ruff-check", "ruff-format", "nbstripout", "dvc-code-deps"} <= set(hooks)
    locked = {line.split("==")[0].lower().replace("_", "-") for line in _lock()}
    assert {"ruff", "nbstripout", "pre-commit"} <= locked
    assert "tools/stage_deps.py --check" in hooks["dvc-code-deps"]["entry"]


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        code = [cell for cell in cells if cell.cell_type == "code"]
        assert code, path
        assert not any(cell.outputs or cell.execution_count for cell in code), (
            f"{path.name} holds outputs: run `make check` (nbstripout)"
        )
