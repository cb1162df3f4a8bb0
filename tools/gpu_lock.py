"""Write requirements-gpu.lock: requirements.lock with the CUDA builds of torch and XGBoost.

Usage: python tools/gpu_lock.py [--cpu-lock requirements.lock] [--out requirements-gpu.lock]
       (`make lock-gpu`; after `make lock`, since tests/unit/test_environment_files.py checks
       that the two locks agree)

How: the CPU lock's pins, with `torch==X+cpu` -> `torch==X` (PyPI's torch for Linux x86-64 is
the CUDA build: it pulls the nvidia-* CUDA libraries and triton) and `xgboost-cpu==Y` ->
`xgboost==Y` (the wheel with CUDA support), resolved by pip's own resolver:
`pip install --dry-run --ignore-installed --report`, which downloads package metadata only and
installs nothing (about two minutes). The lock is every package pip would install, as
`name==version`, sorted and spelled as in requirements.lock.

Only the index (PyPI unless --index-url, e.g. a mirror) is consulted: pip's configuration files
are not read and its find-links / index variables are dropped, because a wheel directory or an
extra index holding the CPU wheel `torch-X+cpu` satisfies `torch==X` and pip prefers it.
Certificate and proxy environment variables (PIP_CERT, HTTPS_PROXY, ...) still apply. The lock
is for Python 3.11 on Linux x86-64, the platform of the project's GPU machines; pip resolves for
the interpreter running it, so this refuses others.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple"
HEADER = (
    "# Generated from requirements.lock by tools/gpu_lock.py (make lock-gpu): do not edit.\n"
    "# The CUDA environment (`make setup GPU=1`, docs/gpu.md): the CPU lock with torch from PyPI\n"
    "# (a CUDA {cuda} build) and xgboost instead of xgboost-cpu.\n"
    "# Resolved by pip for {platform}.\n"
)
# pip settings (environment) that add package sources or replace the index: dropped.
DROPPED = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_NO_INDEX")


def canonical(name: str) -> str:
    """PEP 503 normalised project name (`open_clip_torch` -> `open-clip-torch`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: Sequence[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def gpu_requirements(cpu_pins: Sequence[str]) -> list[str]:
    """The CPU lock's pins with the two CPU-only distributions swapped for their CUDA builds."""
    swapped, torch_done, xgboost_done = [], False, False
    for pin in cpu_pins:
        name, _, version = pin.partition("==")
        if canonical(name) == "torch" and version.endswith("+cpu"):
            pin, torch_done = f"torch=={version.removesuffix('+cpu')}", True
        elif canonical(name) == "xgboost-cpu":
            pin, xgboost_done = f"xgboost=={version}", True
        swapped.append(pin)
    if not (torch_done and xgboost_done):
        raise SystemExit(
            "requirements.lock should pin torch==<version>+cpu and xgboost-cpu==<version>; "
            f"found torch +cpu: {torch_done}, xgboost-cpu: {xgboost_done}"
        )
    return swapped


def pip_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without pip's package-source settings, and no pip configuration file (pip
    reads none when PIP_CONFIG_FILE is the null device; an empty value would be ignored)."""
    env = {k: v for k, v in environ.items() if k not in DROPPED}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def resolve(requirements: Sequence[str], python: str, index_url: str) -> dict:
    """pip's installation report for `requirements` (nothing is installed)."""
    with tempfile.TemporaryDirectory(prefix="gpu-lock-") as tmp:
        wanted, report = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        wanted.write_text("\n".join(requirements) + "\n")
        command = [
            python,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--index-url",
            index_url,
            "--report",
            str(report),
            "-r",
            str(wanted),
        ]
        subprocess.run(command, check=True, env=pip_environment(os.environ))
        return json.loads(report.read_text())


def check_platform(environment: Mapping[str, str]) -> str:
    """The resolution's platform as a phrase; SystemExit unless Python 3.11 on Linux x86-64."""
    python = environment.get("python_version")
    system, machine = environment.get("sys_platform"), environment.get("platform_machine")
    if (python, system, machine) != ("3.11", "linux", "x86_64"):
        raise SystemExit(
            f"pip resolved for Python {python} on {system} {machine}; the GPU lock is for "
            "Python 3.11 on Linux x86-64: run this there (`make lock-gpu`)"
        )
    return f"CPython {environment.get('python_full_version', python)} on Linux x86-64"


def lock_lines(installs: Sequence[Mapping], cpu_pins: Sequence[str]) -> list[str]:
    """`name==version` per package of the report, spelled and sorted as requirements.lock."""
    spelling = {canonical(pin.partition("==")[0]): pin.partition("==")[0] for pin in cpu_pins}
    lines = []
    for item in installs:
        metadata = item["metadata"]
        name = spelling.get(canonical(metadata["name"]), metadata["name"])
        lines.append(f"{name}=={metadata['version']}")
    return sorted(lines, key=lambda line: line.partition("==")[0].lower())


def write_lock(cpu_lock: Path, out: Path, python: str, index_url: str) -> list[str]:
    cpu_pins = pins(cpu_lock.read_text().splitlines())
    report = resolve(gpu_requirements(cpu_pins), python, index_url)
    platform = check_platform(report.get("environment", {}))
    lines = lock_lines(report["install"], cpu_pins)
    torch_pin = next((line for line in lines if line.startswith("torch==")), "")
    if not torch_pin or "+" in torch_pin:
        raise SystemExit(f"resolved {torch_pin or 'no torch'}: expected PyPI's CUDA build")
    if not any(line.startswith("nvidia-") for line in lines):
        raise SystemExit(f"{torch_pin} pulled no nvidia-* packages: not a CUDA build")
    runtime = next((line for line in lines if line.startswith("nvidia-cuda-runtime")), "==?")
    cuda = ".".join(runtime.split("==")[1].split(".")[:2])
    out.write_text(HEADER.format(cuda=cuda, platform=platform) + "\n".join(lines) + "\n")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-lock", type=Path, default=ROOT / "requirements.lock")
    parser.add_argument("--out", type=Path, default=ROOT / "requirements-gpu.lock")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to resolve for")
    parser.add_argument("--index-url", default=PYPI, help="the one index to resolve against")
    args = parser.parse_args(argv)
    lines = write_lock(args.cpu_lock, args.out, args.python, args.index_url)
    print(f"{args.out}: {len(lines)} pins")


if __name__ == "__main__":
    main()
