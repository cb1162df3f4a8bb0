"""OOF SMAPE of every fusion head and every fusion loss on the real rows, same inputs, same folds.

    python benchmarks/real_project.py /tmp/pricefuse-real          # once: embed, neighbours, linear
    python benchmarks/fusion_heads.py --project /tmp/pricefuse-real --seeds 42 43 44
    python benchmarks/fusion_heads.py --project /tmp/pricefuse-real --losses none \
        --set "fusion.modalities=[text,image,tabular]"
    python benchmarks/fusion_heads.py --project /tmp/pricefuse-real --archs dcn --losses none
    python benchmarks/fusion_heads.py --project /tmp/pricefuse-real --losses none \
        --seeds 42 43 44 --results fusion_heads   # also docs/results/fusion_heads.json

What runs: the `train_fusion` stage's own rows (`fusion_member.load_split`: the parsed table,
the neighbour features, the stacked linear member's OOF predictions and the embeddings of that
project) and its own K-fold loop (`train_kfold`), once per configuration, with the project's
params.yaml plus `--set` for all and one override per configuration:
  every head of `--archs` (default: all of pricefuse.models.fusion.heads.HEADS) with the default
  loss;
  every loss of `--losses` (default: pricefuse.models.fusion.losses.LOSS_NAMES, plus the schedules
  in SCHEDULES) with the default head; a loss that needs the sigmoid readout gets
  `fusion.output=sigmoid`.
With `--seeds 42 43 44` each configuration trains once per seed (same folds; the seed of the
weights' initialisation and the batch order): the differences between heads are about the
spread between seeds, so the default is picked by the mean over seeds. Each run is logged as a
`train_fusion` run (params, smape_oof, smape_fold_k, train_seconds; tag train_seed) in the
MLflow experiment `--experiment` of the project's store, and the table and plot at the end are
`pricefuse compare`'s over that experiment (written to `--out`), so `cd <project> && pricefuse
compare --experiment fusion-heads` shows them again. Prints figures; not a test. About a
minute per configuration and seed on 2 CPU cores (tabular inputs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import mlflow

from pricefuse.core.config import Params, load_params
from pricefuse.models.fusion import losses
from pricefuse.models.fusion.heads import HEADS
from pricefuse.models.fusion.member import MEMBER, load_split
from pricefuse.models.fusion.training import KFoldResult, train_kfold
from pricefuse.recording import compare, tracking

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import add_results_option, table, write_results

STAGE = "train_fusion"
SCHEDULES = ("huber>smape", "mse>smape")
BY = ("fusion.arch", "fusion.loss", "fusion.modalities")


def configurations(archs: list[str], loss_names: list[str], default_loss: str) -> list[list[str]]:
    """One override list per configuration: each head (default loss), then each other loss."""
    configs = [[f"fusion.arch={arch}"] for arch in archs]
    for name in loss_names:
        if name == default_loss and archs:
            continue  # already trained as the default head's run
        override = [f"fusion.loss={name}"]
        if set(name.split(losses.PHASE_SEPARATOR)) & losses.BOUNDED_LOSSES:
            override.append("fusion.output=sigmoid")
        configs.append(override)
    return configs


def log_result(
    params: Params, result: KFoldResult, experiment: str, label: str, train_seed: int
) -> str:
    """One FINISHED `train_fusion` run with the stage's tags, params and metrics; its id. The
    training seed is a tag, not the `seed` param: that one assigned the folds, and runs on the
    same folds must keep it (pricefuse compare groups runs into fold sets by it)."""
    tracking.configure(experiment)
    data_md5 = tracking.files_md5([Path(params.data.train_csv), Path(params.data.test_csv)])
    with mlflow.start_run(run_name=STAGE) as run:
        mlflow.set_tags(
            {
                "stage": STAGE,
                "data_md5": data_md5,
                "benchmark": "fusion_heads",
                "train_seed": str(train_seed),
            }
        )
        mlflow.set_tag("mlflow.note.content", f"benchmarks/fusion_heads.py: {label}")
        tracking.log_flat_params(params)
        metrics = {"smape_oof": result.smape_oof, "train_seconds": result.seconds}
        metrics.update({f"smape_fold_{k}": s for k, s in enumerate(result.fold_smape)})
        mlflow.log_metrics(metrics)
        return run.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="benchmarks/real_project.py")
    parser.add_argument("--archs", nargs="*", default=sorted(HEADS), help="'none' for no heads")
    parser.add_argument("--losses", nargs="*", default=None, help="'none' for no loss runs")
    parser.add_argument("--set", action="append", default=[], help="key=value for every run")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="training seeds (default: params seed)"
    )
    parser.add_argument("--experiment", default="fusion-heads")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pricefuse-fusion-heads"))
    add_results_option(parser, "fusion_heads")
    args = parser.parse_args()
    here = Path.cwd()

    os.chdir(args.project)  # the project's relative data paths and its mlflow.db
    base = load_params("params.yaml", args.set)
    archs = [] if args.archs == ["none"] else args.archs
    if args.losses is None:
        loss_names = [*losses.LOSS_NAMES, *SCHEDULES]
    else:
        loss_names = [] if args.losses == ["none"] else args.losses
    train = load_split(base, "train")
    print(
        f"{MEMBER}: {len(train)} train rows, {train.frame['fold'].nunique()} folds, project "
        f"{args.project}; every run: {' '.join(args.set) or '(params.yaml)'}",
        flush=True,
    )
    for overrides in configurations(archs, loss_names, base.fusion.loss):
        params = load_params("params.yaml", [*args.set, *overrides])
        for seed in args.seeds or [params.seed]:
            label = " ".join([*overrides, f"(train seed {seed})"])
            result = train_kfold(train, params.fusion, seed, progress=True)
            run_id = log_result(params, result, args.experiment, label, seed)
            epochs = [h.best_epoch for h in result.histories.values()]
            folds = " ".join(f"{s:.2f}" for s in result.fold_smape)
            print(
                f"{label:<58} OOF SMAPE {result.smape_oof:7.3f}  folds [{folds}]  best epochs "
                f"{epochs}  {result.seconds:5.0f} s  run {run_id[:8]}",
                flush=True,
            )
    uri = tracking.default_tracking_uri()
    runs = compare.load_runs(args.experiment, STAGE, uri)
    result = compare.compare_runs(runs, STAGE, BY, rank="mean")
    csv_path, png_path = compare.write_outputs(result, args.out)
    print("\n" + result.to_text())
    # The default should not hinge on one lucky seed: ranked by the mean over training seeds.
    best = result.table.iloc[0]
    chosen = ", ".join(f"{key}={best[key]}" for key in BY)
    print(
        f"\nbest by the mean over runs: {chosen} (OOF SMAPE mean {best['smape_oof_mean']:.3f} "
        f"over {best['runs']} run(s), best {best['smape_oof_best']:.3f})"
    )
    print(f"wrote {csv_path} and {png_path}")
    if args.results:
        os.chdir(here)  # a relative --results path, like the command line, is the caller's
        write_results(args.results, [results_table(result, train, args)])


def results_table(result: compare.Comparison, train, args: argparse.Namespace) -> dict:
    """`pricefuse compare`'s table over the benchmark's runs, as a docs/results table."""
    rows = [
        [
            *(str(r[key]) for key in BY),
            int(r["runs"]),
            r["smape_oof_mean"],
            r["smape_oof_std"],
            r["smape_oof_best"],
            r[compare.TIME_METRIC],
        ]
        for _, r in result.table.iterrows()
    ]
    seeds = " ".join(map(str, args.seeds or []))
    title = (
        f"Fusion OOF SMAPE (%) on {len(train):,} train rows, "
        f"{train.frame['fold'].nunique()} folds, ranked by the mean over the runs"
        + (f" (training seeds {seeds})" if seeds else "")
    )
    columns = [*BY, "runs", "mean", "std", "best", "train seconds"]
    formats = [None, None, None, None, ".2f", ".2f", ".2f", ".0f"]
    notes = "Every run: " + (" ".join(args.set) or "the project's params.yaml") + "."
    return table(title, columns, rows, notes=notes, formats=formats)


if __name__ == "__main__":
    main()
