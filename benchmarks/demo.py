"""What `make demo` prints and how long it takes, in a fresh copy of the project.

    python benchmarks/demo.py                       # a temp project, deleted at the end
    python benchmarks/demo.py --keep /tmp/pf-demo   # keep it (for benchmarks/serve.py, dvc_noop.py)
    python benchmarks/demo.py --results             # also write docs/results/demo.json

Runs `make demo`'s three commands (`pricefuse demo-data`, `dvc repro`, `pricefuse evaluate`) in
the integration tests' project copy (`tests.support.copy_project`: code, pipeline and
params.yaml as they are, in a fresh git + DVC repo, the installed environment), then a second
`dvc repro`, which must re-run nothing. Prints the seconds of each, the out-of-fold SMAPE of every
model (what `pricefuse evaluate` reports) and the ablation table. `make setup` (the virtualenv)
is not part of it. Figures depend on the machine and its load; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the Makefile exports it
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import add_results_option, table, write_results  # noqa: E402

from tests.support import copy_project, run_cmd  # noqa: E402

# `pricefuse evaluate`'s model names -> the column headings the docs use
LABELS = {"lightgbm": "LightGBM", "xgboost": "XGBoost", "catboost": "CatBoost"}


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = run_cmd(command, cwd, timeout=7200)
    return time.perf_counter() - started, result.stdout


def scores(project: Path) -> tuple[list[str], list[float], list[list]]:
    """(model labels, OOF SMAPE per model, ablation rows) of the built project."""
    from pricefuse.analysis.reports import ablation_report, oof_report
    from pricefuse.core.config import load_params

    here = Path.cwd()
    os.chdir(project)  # the layout's paths are relative to the project root
    try:
        report = oof_report(load_params("params.yaml"))
        ablation = ablation_report()
    finally:
        os.chdir(here)
    metrics = json.loads((project / "metrics" / "ensemble.json").read_text())
    meta = json.loads((project / "data" / "models" / "ensemble" / "meta.json").read_text())
    method = meta.get("method")
    labels, values = [], []
    for model, value in zip(report["model"], report["smape_oof"], strict=True):
        if model == "ensemble":
            continue
        labels.append(LABELS.get(model, model))
        values.append(float(value))
    labels += ["equal-weight mean", f"ensemble ({method})" if method else "ensemble"]
    values += [metrics["smape_oof_mean"], metrics["smape_oof"]]
    rows = [] if ablation is None else ablation.values.tolist()
    return labels, values, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="build here and keep it")
    add_results_option(parser, "demo")
    args = parser.parse_args()
    root = (args.keep or Path(tempfile.mkdtemp(prefix="pricefuse-demo-"))).resolve()
    try:
        copy_project(root, {})
        steps = {}
        for label, command in [
            ("pricefuse demo-data", ["pricefuse", "demo-data"]),
            ("dvc repro (every stage)", ["dvc", "repro"]),
            ("pricefuse evaluate", ["pricefuse", "evaluate"]),
            ("dvc repro again (nothing to re-run)", ["dvc", "repro"]),
        ]:
            seconds, out = timed(command, root)
            steps[label] = seconds
            print(f"{label:<40} {seconds:7.1f} s", flush=True)
            if label.startswith("pricefuse evaluate"):
                print(out)
            if label.startswith("dvc repro again") and "Running stage" in out:
                raise SystemExit("the second dvc repro re-ran a stage: not a no-op")
        total = sum(v for k, v in steps.items() if not k.startswith("dvc repro again"))
        labels, values, ablation = scores(root)
        rows = {}
        for split in ("train", "test"):
            import pandas as pd

            rows[split] = len(pd.read_parquet(root / "data" / "interim" / f"{split}.parquet"))
        print(f"make demo's commands: {total:.0f} s ({total / 60:.1f} min)")
        if args.results:
            timing = [[k, v] for k, v in steps.items()]
            timing.append(["make demo's three commands, in all", total])
            write_results(
                args.results,
                [
                    table(
                        f"OOF SMAPE (%) on the demo data ({rows['train']:,} train rows, "
                        "5 group folds), as `pricefuse evaluate` prints it",
                        labels,
                        [values],
                    ),
                    table(
                        "Ablation (`metrics/ablation.json`): each member alone, the blend "
                        "without each member, the fusion head per modality",
                        ["group", "name", "OOF SMAPE (%)"],
                        ablation,
                    ),
                    table(
                        f"Seconds per command ({rows['train']:,} train / {rows['test']:,} test "
                        "demo rows, `make setup` excluded)",
                        ["command", "seconds"],
                        timing,
                        formats=[None, ".1f"],
                    ),
                ],
            )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
