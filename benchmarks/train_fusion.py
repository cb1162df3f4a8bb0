"""Time the fusion head's K-fold training (`train_kfold`) on the unit tests' synthetic problem.

    python benchmarks/train_fusion.py                     # 600 train / 150 test rows, 1 thread
    python benchmarks/train_fusion.py --rows 6000 --threads 2

The rows and the config are tests/unit/test_train_fusion.py's (`synthetic`, `CFG`: 4 folds,
every modality); that test checks what training learns, this prints how long it takes: seconds
in all and per fold, epochs run (early stopping) and the OOF SMAPE. Figures depend on the
machine and its load; not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pricefuse.models.train import train_kfold  # noqa: E402
from tests.unit.test_train_fusion import CFG, synthetic  # noqa: E402  (the test's own problem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--test-rows", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = synthetic(args.rows, seed=1)
    test = synthetic(args.test_rows, seed=2, with_target=False)
    result = train_kfold(train, CFG, seed=7, test=test)
    epochs = [len(h.val_smape) for h in result.histories.values()]
    print(
        f"{args.rows} train / {args.test_rows} test rows, {len(epochs)} folds, "
        f"{args.threads} thread(s), up to {CFG.epochs} epochs"
    )
    print(
        f"train_kfold: {result.seconds:.2f} s ({result.seconds / len(epochs):.2f} s a fold), "
        f"epochs run {epochs}, OOF SMAPE {result.smape_oof:.2f}"
    )


if __name__ == "__main__":
    main()
