"""OOF SMAPE of the boosters with the featurizer fitted on every train row (the old, leaky way)
and inside each fold (the current way), on the same rows, folds and parameters.

Why: the featurizer fits PCA bases and category vocabularies. Fitted on all train rows, each OOF
prediction saw its own fold through them, which flatters OOF SMAPE; this prints by how much.

Run after `dvc repro` has written the parsed tables and embeddings (e.g. on the real rows):

    python benchmarks/gbdt_leak.py [--project DIR] [--results]

Neighbour features and stacked members are left out, so only the featurizer differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from pricefuse.core.config import load_params
from pricefuse.core.layout import Layout
from pricefuse.features.fold_features import FoldFeatures, fold_features
from pricefuse.features.tabular import Embeddings, TabularFeaturizer
from pricefuse.models.gbdt.training import train_kfold_boosters
from pricefuse.pipeline.inputs import load_rows, train_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import add_results_option, table, write_results


def global_fold_features(parsed, emb: Embeddings, folds: np.ndarray, cfg, seed: int):
    """The old behaviour: one featurizer fitted on every train row, shared by all folds."""
    featurizer = TabularFeaturizer(cfg.text_pca, cfg.image_pca, seed).fit(parsed, emb)
    x = featurizer.transform(parsed, emb)
    return [
        FoldFeatures(int(k), folds == k, featurizer, x.take(folds != k), x.take(folds == k))
        for k in np.unique(folds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="project root")
    parser.add_argument("--objective", default=None, help="gbdt.objective (default: params)")
    add_results_option(parser, "gbdt_leak")
    args = parser.parse_args()
    os.chdir(args.project)
    params = load_params("params.yaml")
    cfg = dataclasses.replace(params.gbdt, stack_members=())
    if args.objective:
        cfg = dataclasses.replace(cfg, objective=args.objective)
    batch = load_rows(Layout(params.data), "train", neighbours=False)
    y, folds = train_targets(batch.parsed)
    emb = Embeddings(batch.text, batch.image, batch.image_mask)
    ways = {
        "featurizer on all rows (leaky)": global_fold_features(
            batch.parsed, emb, folds, cfg, params.seed
        ),
        "featurizer inside each fold": fold_features(batch.parsed, emb, folds, cfg, params.seed),
    }
    print(f"{len(y)} train rows, {len(np.unique(folds))} folds, objective {cfg.objective}")
    print(f"{'featurizer':<32}" + "".join(f"{b:>11}" for b in cfg.boosters))
    rows = []
    for label, sets in ways.items():
        result = train_kfold_boosters(sets, y, cfg, params.seed)
        rows.append([label, *(result.oof_smape[b] for b in cfg.boosters)])
        print(f"{label:<32}" + "".join(f"{result.oof_smape[b]:11.3f}" for b in cfg.boosters))
    if args.results:
        title = (
            f"Boosters' OOF SMAPE (%), featurizer fitted on all rows vs inside each fold "
            f"({len(y):,} train rows, {len(np.unique(folds))} folds, objective {cfg.objective}, "
            "no neighbour or stacked features)"
        )
        write_results(args.results, [table(title, ["featurizer", *cfg.boosters], rows)])


if __name__ == "__main__":
    main()
