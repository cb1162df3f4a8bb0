"""Write conda.yaml from requirements.lock, so conda users get the same pinned environment.

Usage: python tools/conda_env.py requirements.lock > conda.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

PYTHON = "3.11.7"


def conda_yaml(lock_lines: list[str]) -> str:
    pins = [line.strip() for line in lock_lines if line.strip() and not line.startswith("#")]
    lines = [
        "# Generated from requirements.lock by tools/conda_env.py (make lock): do not edit.",
        "name: pricefuse",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        f"  - python={PYTHON}",
        "  - pip",
        "  - pip:",
        *[f"      - {pin}" for pin in pins],
        "      - -e .",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(conda_yaml(Path(sys.argv[1]).read_text().splitlines()))
