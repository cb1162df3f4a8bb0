"""Time the fusion heads' K-fold training (`train_kfold`) on the unit tests' synthetic problem.

    python benchmarks/train_fusion.py                     # 600 train / 150 test rows, 1 thread
    python benchmarks/train_fusion.py --rows 6000 --threads 2
    python benchmarks/train_fusion.py --arch all          # every head in the registry
    python benchmarks/train_fusion.py --arch dcn --arch towers
    python benchmarks/train_fusion.py --arch all --results  # also docs/results/train_fusion.json

The rows and the config are tests/unit/test_train_fusion.py's (`synthetic`, `CFG`: 4 folds,
every modality; gated_residual at its test width, the other heads at params.yaml's
`fusion.heads` sizes); that test checks what training learns, this prints per head how long it
takes: seconds in all and per fold, epochs run (early stopping), the head's parameter count and
the OOF SMAPE. Figures depend on the machine and its load; not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import add_results_option, table, write_results  # noqa: E402

from pricefuse.models.fusion.heads import HEADS  # noqa: E402
from pricefuse.models.fusion.training import train_kfold  # noqa: E402
from tests.unit.test_train_fusion import CFG, synthetic  # noqa: E402  (the test's own problem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--test-rows", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--arch",
        action="append",
        choices=[*sorted(HEADS), "all"],
        help="head(s) to train (repeatable; default gated_residual; all = every head)",
    )
    add_results_option(parser, "train_fusion")
    args = parser.parse_args()
    archs = args.arch or ["gated_residual"]
    if "all" in archs:
        archs = list(HEADS)
    torch.set_num_threads(args.threads)
    train = synthetic(args.rows, seed=1)
    test = synthetic(args.test_rows, seed=2, with_target=False)
    print(
        f"{args.rows} train / {args.test_rows} test rows, {args.threads} thread(s), "
        f"up to {CFG.epochs} epochs"
    )
    rows = []
    for arch in archs:
        result = train_kfold(train, dataclasses.replace(CFG, arch=arch), seed=7, test=test)
        epochs = [len(h.val_smape) for h in result.histories.values()]
        head = result.predictor.folds[0].head
        n_params = sum(p.numel() for p in head.parameters())
        print(
            f"{arch:<16} {n_params:>9,} params  train_kfold {result.seconds:6.2f} s "
            f"({result.seconds / len(epochs):.2f} s a fold), epochs run {epochs}, "
            f"OOF SMAPE {result.smape_oof:.2f}"
        )
        epochs_run = " ".join(str(e) for e in epochs)
        rows.append([arch, n_params, result.seconds, result.seconds / len(epochs), epochs_run])
        rows[-1].append(result.smape_oof)
    if args.results:
        title = (
            f"Fusion heads' K-fold training on the unit tests' synthetic rows ({args.rows} train "
            f"/ {args.test_rows} test, {len(epochs)} folds, {args.threads} thread(s))"
        )
        columns = ["head", "parameters", "seconds", "seconds a fold", "epochs run per fold"]
        columns.append("OOF SMAPE (%)")
        formats = [None, ",", ".1f", ".2f", None, ".2f"]
        write_results(args.results, [table(title, columns, rows, formats=formats)])


if __name__ == "__main__":
    main()
