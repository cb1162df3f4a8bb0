"""The environment is described once (requirements.lock); the other files derive from it."""

import subprocess
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


# The CUDA environment (`make setup GPU=1`, docs/gpu.md): requirements-gpu.lock, generated from
# requirements.lock by tools/gpu_lock.py (`make lock-gpu`).
CUDA_PACKAGES = ("nvidia-", "cuda-", "triton")
# In pip's resolution but not in `pip freeze` output (requirements.lock): setuptools (freeze leaves
# it out; the CUDA torch wheel requires it) and python-discovery (virtualenv's dependency, which
# the CPU lock misses; `make lock` would add it).
FREEZE_OMITS = {"setuptools", "python-discovery"}


def _versions(lines: list[str]) -> dict[str, str]:
    canonical = {}
    for line in lines:
        name, _, version = line.partition("==")
        canonical[name.lower().replace("_", "-").replace(".", "-")] = version
    return canonical


def test_gpu_lock_is_the_cpu_lock_with_the_cuda_builds():
    gpu_lines = (ROOT / "requirements-gpu.lock").read_text().splitlines()
    gpu_pins = [line.strip() for line in gpu_lines if line.strip() and not line.startswith("#")]
    assert all("==" in line for line in gpu_pins), "every lock line is an exact pin"
    assert not [line for line in gpu_pins if "+cpu" in line]
    cpu, gpu = _versions(_lock()), _versions(gpu_pins)
    assert gpu["torch"] == cpu["torch"].removesuffix("+cpu")
    assert "xgboost-cpu" not in gpu and gpu["xgboost"] == cpu["xgboost-cpu"]
    cuda = {name for name in gpu if name.startswith(CUDA_PACKAGES)}
    assert "triton" in cuda and any(name.startswith("nvidia-cudnn") for name in cuda)
    shared = {
        name: version for name, version in cpu.items() if name not in ("torch", "xgboost-cpu")
    }
    assert {name: gpu.get(name) for name in shared} == shared, "run `make lock-gpu`"
    extra = set(gpu) - set(shared) - cuda - {"torch", "xgboost"}
    assert extra <= FREEZE_OMITS, f"in the GPU lock only: {sorted(extra - FREEZE_OMITS)}"


def test_make_gpu_1_installs_the_gpu_lock_into_its_own_venv():
    def commands(*args: str) -> str:
        return subprocess.run(
            ["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    cpu = commands("-W", "requirements.lock", "setup")
    assert "-m pip install -q -r requirements.lock" in cpu and ".venv-gpu" not in cpu
    gpu = commands("-W", "requirements-gpu.lock", "setup", "GPU=1")
    assert ".venv-gpu/bin/python -m pip install -q -r requirements-gpu.lock" in gpu
    assert "torch.version.cuda" in gpu and "requirements.lock" not in gpu.replace("-gpu.lock", "")
    assert ".venv-gpu/" in (ROOT / ".gitignore").read_text().splitlines()
