"""Build a project on the real competition rows, up to the stages a benchmark needs.

    python benchmarks/real_project.py /tmp/pricefuse-real    # embed, neighbours, linear
    python benchmarks/real_project.py /tmp/pricefuse-real --stages preprocess
    python benchmarks/real_project.py /tmp/pricefuse-real --set preprocess.text_clean=[emoji]

The project is the integration tests' copy (`tests.support.copy_project`: code, pipeline and
params in a fresh git + DVC repo) with the rows of `../shared/data/amazon2025` written as the
real tests write them (`write_real_rows`: image links pointed at the shared image files; the
first 300 test rows). `dvc repro <stages>` then runs in it (default: what the fusion head reads,
i.e. the embeddings, the neighbour features and the linear member's OOF predictions). An
existing directory is re-used with today's code and params (plus --set): DVC re-runs only
what changed. Nothing derived from the data
leaves that directory; keep it outside the repository. Benchmarks that train on these rows
(`benchmarks/fusion_heads.py`, `benchmarks/text_cleaning.py`) take it as `--project`.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pricefuse.core.config import ConfigError, apply_overrides  # noqa: E402
from tests.real.test_real_pipeline import write_real_rows  # noqa: E402
from tests.support import copy_project, deep_update, refresh_project  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data" / "amazon2025"
DEFAULT_STAGES = ("neighbours", "train_linear")
# The machine is offline: links without a shared image copy fail fast instead of retrying.
OVERRIDES = {
    "data": {"train_csv": "real/train.csv", "test_csv": "real/test.csv"},
    "fetch": {"connect_timeout": 2.0, "read_timeout": 5.0, "retries": 1},
}


def parse_set(values: list[str]) -> dict:
    """`section.key=value` pairs -> a nested override dict (the CLI's own `--set` parsing)."""
    try:
        return apply_overrides({}, values)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc


def build(project: Path, stages: list[str], overrides: dict) -> Path:
    """Create (or update the params of) the project and run `dvc repro` on `stages`."""
    if not (SHARED_DATA / "train.csv").is_file():
        raise SystemExit(f"real rows not found at {SHARED_DATA}")
    wanted = deep_update(copy.deepcopy(OVERRIDES), overrides)
    if not (project / "dvc.yaml").is_file():
        copy_project(project, wanted)
        write_real_rows(project, SHARED_DATA)
    else:  # today's code, pipeline and params (+ overrides); DVC re-runs what they change
        refresh_project(project, wanted)
    subprocess.run(["dvc", "repro", *stages], cwd=project, check=True)
    return project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES))
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    args = parser.parse_args()
    build(args.project.resolve(), args.stages, parse_set(args.set))
    print(f"real project ready: {args.project}")


if __name__ == "__main__":
    main()
