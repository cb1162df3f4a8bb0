"""Build a project on the real competition rows, up to the stages a benchmark needs.

    python benchmarks/real_project.py /tmp/pricefuse-real    # embed, neighbours, linear
    python benchmarks/real_project.py /tmp/pricefuse-real --stages preprocess
    python benchmarks/real_project.py /tmp/pricefuse-real --set preprocess.remove_emoji=true
    python benchmarks/real_project.py /tmp/pricefuse-real --stages ensemble --results real_project

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
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import add_results_option, table, write_results  # noqa: E402

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


# `pricefuse evaluate`'s model names -> the column headings the docs use
LABELS = {"lightgbm": "LightGBM", "xgboost": "XGBoost", "catboost": "CatBoost"}


def oof_tables(project: Path, settings: str, seconds: float) -> list[dict]:
    """The ensemble's OOF report of a project built up to `ensemble` (what `pricefuse evaluate`
    prints, plus the equal-weight mean and the folds), as docs/results tables."""
    from pricefuse.analysis.reports import oof_report
    from pricefuse.core.config import load_params

    metrics = json.loads((project / "metrics" / "ensemble.json").read_text())
    method = json.loads((project / "data" / "models" / "ensemble" / "meta.json").read_text())
    here = Path.cwd()
    os.chdir(project)  # the layout's paths are relative to the project root
    try:
        report = oof_report(load_params("params.yaml"))
    finally:
        os.chdir(here)
    models = [m for m in report["model"] if m != "ensemble"]
    columns = [LABELS.get(m, m) for m in models]
    columns += ["equal-weight mean", f"ensemble ({method.get('method', '?')})"]
    scores = dict(zip(report["model"], report["smape_oof"], strict=True))
    values = [scores[m] for m in models] + [metrics["smape_oof_mean"], metrics["smape_oof"]]
    folds = sorted(k for k in metrics if k.startswith("smape_fold_"))
    return [
        table(
            f"OOF SMAPE (%) on the real train rows, {len(folds)} group folds ({settings})",
            columns,
            [values],
        ),
        table(
            "The ensemble's SMAPE (%) per held-out fold",
            [f"fold {k.rsplit('_', 1)[1]}" for k in folds],
            [[metrics[k] for k in folds]],
        ),
        interval_table(metrics),
        table(
            "Seconds of this run's `dvc repro` (stages already up to date take none)",
            ["seconds"],
            [[seconds]],
            formats=[".0f"],
        ),
    ]


def interval_table(metrics: dict[str, float]) -> dict:
    """The ensemble's price intervals: coverage in sample and cross-fitted, mean width."""
    levels = sorted(
        int(k.rsplit("_", 1)[1]) for k in metrics if re.fullmatch(r"interval_coverage_\d+", k)
    )
    rows = [
        [
            f"{level}%",
            metrics[f"interval_coverage_{level}"],
            metrics[f"interval_coverage_cv_{level}"],
            metrics[f"interval_width_pct_{level}"],
        ]
        for level in levels
    ]
    columns = ["level", "coverage in sample", "coverage cross-fitted", "mean width (% of price)"]
    title = "The ensemble's price intervals on its OOF predictions (all rows)"
    return table(title, columns, rows, formats=[None, ".1%", ".1%", ".0f"])


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


def settings_label(values: list[str]) -> str:
    return "default params" if not values else "default params but " + ", ".join(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES))
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    add_results_option(parser, "real_project")
    args = parser.parse_args()
    started = time.perf_counter()
    project = build(args.project.resolve(), args.stages, parse_set(args.set))
    seconds = time.perf_counter() - started
    print(f"real project ready: {args.project}")
    if args.results:
        if not (project / "metrics" / "ensemble.json").is_file():
            raise SystemExit("--results reports the ensemble: run with --stages ensemble")
        write_results(args.results, oof_tables(project, settings_label(args.set), seconds))


if __name__ == "__main__":
    main()
