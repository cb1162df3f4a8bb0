"""OOF SMAPE of the fine-tuned text member on the real rows; the ensemble with and without it.

    python benchmarks/text_real.py [--epochs 2] [--max-length 32] [--keep DIR] [--results]

Builds a temp project over ../shared/data/amazon2025 (read in place; links to the shared images,
as tests/real does), enables `text` in `ensemble.members` with a CPU-sized setting, runs
`dvc repro`, prints the members' and the ensemble's OOF SMAPE, then re-fits only the ensemble
without `text` on the same member predictions and prints that too. Nothing derived from the data
leaves the temp dir (deleted unless --keep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.results import add_results_option, table, write_results  # noqa: E402

from tests.real.test_real_pipeline import write_real_rows  # noqa: E402
from tests.support import copy_project  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "amazon2025"
BASE_MEMBERS = ["fusion", "lightgbm", "xgboost", "catboost", "linear", "knn"]


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        raise SystemExit(f"{' '.join(args)} failed:\n{tail}")
    return result.stdout


def scores(root: Path) -> dict[str, float]:
    metrics = json.loads((root / "metrics/ensemble.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith("smape_oof")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--template", default="{item_name} | {value} {unit} | pack {pack}")
    parser.add_argument("--keep", type=Path, default=None, help="build here and keep it")
    add_results_option(parser, "text_real")
    args = parser.parse_args()
    if not (SHARED / "train.csv").is_file():
        raise SystemExit(f"real rows not found at {SHARED}")
    root = args.keep or Path(tempfile.mkdtemp(prefix="pricefuse-text-real-"))
    root.mkdir(parents=True, exist_ok=True)
    overrides = {
        "data": {"train_csv": "real/train.csv", "test_csv": "real/test.csv"},
        "fetch": {"connect_timeout": 2.0, "read_timeout": 5.0, "retries": 1},
        "ensemble": {"members": [*BASE_MEMBERS, "text"]},
        "text": {
            "epochs": args.epochs,
            "max_length": args.max_length,
            "template": args.template,
            "smape_epochs": 0 if args.epochs < 2 else 1,
        },
    }
    try:
        copy_project(root, overrides)
        write_real_rows(root, SHARED)
        started = time.perf_counter()
        run(["dvc", "repro"], root)
        seconds = time.perf_counter() - started
        text_meta = json.loads((root / "metrics/train_text.json").read_text())
        with_text = scores(root)
        members = ",".join(BASE_MEMBERS)
        run(["pricefuse", "ensemble", "--set", f"ensemble.members=[{members}]"], root)
        without = scores(root)
        print(f"dvc repro with text: {seconds / 60:.1f} min; text {text_meta}")
        print("OOF SMAPE (%) on the real rows, 5 group folds:")
        for key, value in with_text.items():
            print(f"  with text     {key:<28} {value:7.3f}")
        for key in ("smape_oof", "smape_oof_blend"):
            print(f"  without text  {key:<28} {without[key]:7.3f}")
        a, b = with_text["smape_oof"], without["smape_oof"]
        print(f"ensemble: {a:.3f} with text vs {b:.3f} without")
        if args.results:
            names = [k.removeprefix("smape_oof_") for k in with_text if k != "smape_oof"]
            names = [n for n in names if not n.startswith("stack_")] + ["ensemble"]
            keys = [f"smape_oof_{n}" if n != "ensemble" else "smape_oof" for n in names]
            rows = [
                ["with text", *(with_text.get(k) for k in keys)],
                ["without text (ensemble re-fitted)", *(without.get(k) for k in keys)],
            ]
            title = (
                f"OOF SMAPE (%) on the real train rows with the fine-tuned text member "
                f"({args.epochs} epochs, {args.max_length} tokens); `dvc repro` "
                f"{seconds / 60:.1f} min"
            )
            write_results(args.results, [table(title, ["ensemble members", *names], rows)])
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
