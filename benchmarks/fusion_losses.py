"""OOF SMAPE of the fusion head under each `fusion.loss`, on one project's rows and folds.

    python benchmarks/fusion_losses.py --project DIR            # every loss and huber>smape
    python benchmarks/fusion_losses.py --project DIR --loss mse --loss 'huber>smape'

DIR is a project whose pipeline has run up to `train_fusion`'s inputs (parsed rows, embeddings,
neighbour features, the stacked members' predictions), e.g. the kept project of
`python benchmarks/text_real.py --keep DIR` on the real rows. The rows are read as the stage
reads them, with this checkout's params.yaml (and `--set` overrides) resolved inside DIR; only
`fusion.loss` changes between rows of the table, so the encoders, inputs, folds and seed are the
same for all. Losses that need the head's sigmoid readout are reported as refused while the head
has none. Figures depend on the rows; timings on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from pricefuse.config import load_params  # noqa: E402
from pricefuse.models.fusion_member import load_split  # noqa: E402
from pricefuse.models.fusion_training import train_kfold  # noqa: E402
from pricefuse.models.losses import LOSS_NAMES  # noqa: E402

DEFAULT_LOSSES = (*LOSS_NAMES, "huber>smape", "mse>smape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--loss", action="append", help="a fusion.loss value (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="params override, key=value")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml", args.set)
    os.chdir(args.project)
    train = load_split(params, "train")
    print(
        f"{len(train)} rows, modalities {list(params.fusion.modalities)}, "
        f"up to {params.fusion.epochs} epochs, switch {params.fusion.loss_switch}, "
        f"seed {params.seed}"
    )
    print("| fusion.loss | OOF SMAPE | folds | epochs run | seconds |")
    print("|---|---|---|---|---|")
    for loss in args.loss or DEFAULT_LOSSES:
        cfg = dataclasses.replace(params.fusion, loss=loss)
        try:
            result = train_kfold(train, cfg, params.seed)
        except ValueError as exc:
            print(f"| {loss} | refused: {exc} | | | |")
            continue
        folds = ", ".join(f"{s:.2f}" for s in result.fold_smape)
        epochs = ", ".join(str(len(h.val_smape)) for h in result.histories.values())
        print(
            f"| {loss} | {result.smape_oof:.2f} | {folds} | {epochs} | {result.seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
