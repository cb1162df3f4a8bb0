"""Time a no-op `dvc repro` (and `dvc status`): what every re-run costs when nothing changed.

    python benchmarks/dvc_noop.py                  # a temp project on tiny demo data (~3 min)
    python benchmarks/dvc_noop.py --project .      # this checkout, after `make demo`
    python benchmarks/dvc_noop.py --repeats 5
    python benchmarks/dvc_noop.py --results        # also write docs/results/dvc_noop.json

Without --project it builds what tests/integration/test_pipeline.py builds (a git+DVC copy of
the project on its tiny demo parameters), runs the full `dvc repro` once, then times the no-op
ones. That test checks that the second repro re-runs nothing; this prints how long it takes.
DVC re-hashes every dep, so the figure grows with the code deps and data directories: 1.0 s on
2 cores for the tiny project (`dvc status` 0.7 s, the full repro 3 min). Figures depend on the
machine and its load; not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import add_results_option, table, write_results  # noqa: E402

from tests.integration.test_pipeline import TINY  # noqa: E402  (the test's own parameters)
from tests.support import copy_project, run_cmd  # noqa: E402


def tiny_project(root: Path) -> Path:
    """The integration test's project copy (tests/conftest.py `make_project`), demo data made."""
    copy_project(root, TINY)
    run_cmd(["pricefuse", "demo-data"], root)
    return root


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = run_cmd(command, cwd, timeout=3600)
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="an existing project (default: a temp one)")
    parser.add_argument("--repeats", type=int, default=3)
    add_results_option(parser, "dvc_noop")
    args = parser.parse_args()
    rows: list[list] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.project:
            project = args.project.resolve()
            kind = "the project of --project"
        else:
            project = tiny_project(Path(tmp))
            kind = "a temp project on the integration test's tiny demo parameters"
            seconds, _ = timed(["dvc", "repro"], project)
            rows.append(["full dvc repro", seconds])
            print(f"full dvc repro (tiny demo data): {seconds:6.1f} s", flush=True)
        for i in range(args.repeats):
            seconds, out = timed(["dvc", "repro"], project)
            ran = out.count("Running stage")
            note = f"  ({ran} stages re-ran: not a no-op)" if ran else ""
            rows.append([f"no-op dvc repro #{i + 1}{note}", seconds])
            print(f"no-op dvc repro #{i + 1}: {seconds:6.2f} s{note}", flush=True)
        seconds, _ = timed(["dvc", "status"], project)
        rows.append(["dvc status", seconds])
        print(f"dvc status:            {seconds:6.2f} s")
    if args.results:
        title = f"`dvc repro` with nothing to do, on {kind}"
        write_results(args.results, [table(title, ["command", "seconds"], rows)])


if __name__ == "__main__":
    main()
