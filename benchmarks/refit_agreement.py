"""One model refitted on all rows vs the average of the K fold models, per served member.

    python benchmarks/refit_agreement.py --project DIR            # prints the tables
    python benchmarks/refit_agreement.py --project DIR --results  # + docs/results/*.json

DIR is a built project (`dvc repro` has written its parsed tables, embeddings, neighbour features
and the predictions of the stacked members): the benchmark reads DIR's params.yaml and trains on
exactly the rows the train_gbdt and train_fusion stages read (`load_stage_rows`), with the
project's parameters, for the three boosters (`gbdt.boosters`) and the fusion head.

Why (issue: "serve one refit model per member where that keeps accuracy: measure OOF and
test-prediction agreement for the fusion heads and boosters"): the served model runs K fold models
per member and averages them. One model refitted on every train row would cost 1/K of the
inference and of the training time, but only if its predictions are as good as the average's.

What it measures, per member:
  holdout   the project's fold --holdout-fold (default 0) is held out; the other rows are
            re-split into --folds (default 5) folds, seeded by the project's seed. On them: the K
            fold models (the stage's own training loop, early stopping on each fold) and their
            OOF SMAPE; then one refit on all of them. Both predict the held-out rows: SMAPE of
            the fold mean and of the refit against the true prices, and their agreement;
  test      every train row with the project's folds (what the stage trains): the fold models'
            average vs the refit on the test rows (no prices there): agreement SMAPE and the
            correlation of the log predictions, and the fit seconds of both (folds: the K models
            including their held-out and test predictions; refit: one model and its prediction;
            boosters without the featurizer, printed separately).
The refit gets no validation rows, so its size comes from the folds: a booster grows
round(mean best iteration of its fold models) trees; the fusion head trains round(mean best
epoch) epochs as its whole schedule (the learning-rate schedule and `fusion.loss_switch` scale
with it), keeping its best epoch on the training rows (the details table says which it kept).

How to read it: "agreement" is the SMAPE between the fold-mean and the refit predictions (0 when
identical; the same scale as the model's error, so 5 against an error of 26 is a visible
disagreement). A member whose refit holdout SMAPE is no worse than the fold mean's can serve the
refit; a higher refit SMAPE is the price of dropping the average's variance reduction. On the
1,500-row demo project another split seed moved these gaps by a few tenths: read their sign and
size, not the second decimal. The neighbour features and stacked member predictions are the
project's (built on its own folds, so the other rows' features saw the held-out rows' prices):
both sides get the same features, so the comparison is fair and the absolute SMAPEs slightly
optimistic. Seconds depend on the machine and its load. Only aggregate figures are printed and
written.
"""

from __future__ import annotations

import os

# libgomp (xgboost, scikit-learn) reads this once, when it loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pricefuse.core.config import (
    FusionConfig,
    GbdtConfig,
    Params,
    load_raw,
    params_from_dict,
)
from pricefuse.core.device import resolve_device
from pricefuse.core.metrics import smape_from_log
from pricefuse.features.fold_features import fold_features
from pricefuse.features.tabular import Embeddings, TabularFeaturizer
from pricefuse.models.fusion.inputs import SplitData
from pricefuse.models.fusion.predictor import FusionPredictor
from pricefuse.models.fusion.training import train_fold, train_kfold
from pricefuse.models.gbdt.boosters import FitOptions, available_cores, booster_class
from pricefuse.models.gbdt.training import clip_range, train_kfold_boosters
from pricefuse.pipeline.inputs import load_stage_rows, train_targets
from pricefuse.pipeline.members import MemberBatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.results import add_results_option, table, write_results  # noqa: E402


@dataclass
class MemberRun:
    """One member's fold models and refit, predicting the same evaluated rows (log1p)."""

    fold_mean: np.ndarray
    refit: np.ndarray
    oof_smape: float
    fold_size: float  # mean best rounds (boosters) or epochs (fusion) of the fold models
    refit_size: int  # rounds or epochs the refit ran
    refit_kept: int  # trees or best epoch the refit kept
    fold_seconds: float
    refit_seconds: float

    def agreement(self) -> float:
        return smape_from_log(self.fold_mean, self.refit)

    def corr(self) -> float:
        return float(np.corrcoef(self.fold_mean, self.refit)[0, 1])


@dataclass
class Run:
    members: dict[str, MemberRun]
    featurizer_seconds: tuple[float, float]  # boosters' featurizers: K folds, refit


def take(batch: MemberBatch, rows: np.ndarray) -> MemberBatch:
    return MemberBatch(
        batch.parsed.iloc[rows].reset_index(drop=True),
        batch.text[rows],
        batch.image[rows],
        np.asarray(batch.image_mask)[rows],
    )


def embeddings(batch: MemberBatch) -> Embeddings:
    return Embeddings(batch.text, batch.image, batch.image_mask)


def split_data(batch: MemberBatch, folds: np.ndarray | None = None) -> SplitData:
    frame = batch.parsed if folds is None else batch.parsed.assign(fold=folds)
    return SplitData(frame, batch.text, batch.image, batch.image_mask)


def run_boosters(
    train: MemberBatch,
    evaluated: MemberBatch,
    y: np.ndarray,
    folds: np.ndarray,
    cfg: GbdtConfig,
    seed: int,
) -> tuple[dict[str, MemberRun], tuple[float, float]]:
    """The stage's fold loop (featurizer per fold, every booster) and one refit per booster."""
    parsed, emb = train.parsed, embeddings(train)
    started = time.perf_counter()
    sets = fold_features(parsed, emb, folds, cfg, seed, evaluated.parsed, embeddings(evaluated))
    fold_featurize = time.perf_counter() - started
    seconds: dict[str, float] = {}
    last = [time.perf_counter()]

    def lap(name: str, fold: int) -> None:  # a fold's fit and predictions, per booster
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - last[0]
        last[0] = now

    kfold = train_kfold_boosters(sets, y, cfg, seed, on_fold_done=lap)

    started = time.perf_counter()
    featurizer = TabularFeaturizer(cfg.text_pca, cfg.image_pca, seed).fit(parsed, emb)
    x, x_eval = (
        featurizer.transform(parsed, emb),
        featurizer.transform(evaluated.parsed, embeddings(evaluated)),
    )
    refit_featurize = time.perf_counter() - started
    lo, hi = clip_range(y)
    offset = float(np.median(y))
    device = resolve_device(cfg.device, "gbdt.device")
    out = {}
    for name in cfg.boosters:
        rounds = max(1, round(float(np.mean(kfold.best_iterations[name]))))
        # The training rows stand in for the validation set; patience past the last round means
        # no early stop.
        own = dataclasses.replace(cfg, n_estimators=rounds, early_stopping_rounds=rounds + 1)
        options = FitOptions(own, seed, available_cores(), device)
        started = time.perf_counter()
        model = booster_class(name)().fit(x, y - offset, x, y - offset, options)
        refit = np.clip(model.predict(x_eval) + offset, lo, hi)
        out[name] = MemberRun(
            fold_mean=kfold.test[name],
            refit=refit,
            oof_smape=kfold.oof_smape[name],
            fold_size=float(np.mean(kfold.best_iterations[name])),
            refit_size=rounds,
            refit_kept=model.best_iteration,
            fold_seconds=seconds[name],
            refit_seconds=time.perf_counter() - started,
        )
    return out, (fold_featurize, refit_featurize)


def run_fusion(train: SplitData, evaluated: SplitData, cfg: FusionConfig, seed: int) -> MemberRun:
    """The stage's K-fold training (folds from `train.frame['fold']`) and one refit."""
    kfold = train_kfold(train, cfg, seed, test=evaluated)
    best = [h.best_epoch for h in kfold.histories.values()]
    epochs = max(1, round(float(np.mean(best))))
    own = dataclasses.replace(cfg, epochs=epochs, patience=epochs + 1)
    started = time.perf_counter()
    model, history = train_fold(train, train, own, seed, fold=0)
    refit = FusionPredictor([model]).predict(
        evaluated.frame, evaluated.text, evaluated.image, evaluated.image_mask
    )
    assert kfold.test is not None
    return MemberRun(
        fold_mean=kfold.test,
        refit=refit,
        oof_smape=kfold.smape_oof,
        fold_size=float(np.mean(best)),
        refit_size=epochs,
        refit_kept=history.best_epoch,
        fold_seconds=kfold.seconds,
        refit_seconds=time.perf_counter() - started,
    )


def evaluate(
    params: Params,
    rows: dict[str, MemberBatch],
    evaluated: dict[str, MemberBatch],
    y: np.ndarray,
    folds: np.ndarray,
    fusion_name: str,
) -> Run:
    """Every member on the same train rows and folds, predicting the same evaluated rows."""
    members, featurize = run_boosters(
        rows["gbdt"], evaluated["gbdt"], y, folds, params.gbdt, params.seed
    )
    fusion = run_fusion(
        split_data(rows["fusion"], folds),
        split_data(evaluated["fusion"]),
        params.fusion,
        params.seed,
    )
    return Run({**members, fusion_name: fusion}, featurize)


def format_table(spec: dict[str, Any]) -> str:
    """A table() dict as aligned text, with its formats."""
    formats = spec.get("formats") or [None] * len(spec["columns"])

    def cell(value: Any, fmt: str | None) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        return format(value, fmt or (".2f" if isinstance(value, float) else ""))

    cells = [[cell(v, f) for v, f in zip(row, formats, strict=True)] for row in spec["rows"]]
    widths = [max(len(c) for c in column) for column in zip(spec["columns"], *cells, strict=True)]

    def line(values: Sequence[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = (v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    out = [spec["title"], line(spec["columns"]), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    if spec.get("notes"):
        out.append(spec["notes"])
    return "\n".join(out)


def tables(
    holdout: Run,
    test: Run,
    held_rows: int,
    train_rows: int,
    test_rows: int,
    holdout_smape: Callable[[np.ndarray], float],
    args: argparse.Namespace,
    n_folds: int,
) -> list[dict[str, Any]]:
    names = list(test.members)
    main_rows = []
    detail_rows = []
    for name in names:
        h, t = holdout.members[name], test.members[name]
        main_rows.append(
            [
                name,
                holdout_smape(h.fold_mean),
                holdout_smape(h.refit),
                h.agreement(),
                t.agreement(),
                t.corr(),
                t.fold_seconds,
                t.refit_seconds,
            ]
        )
        unit = "epochs" if name.startswith("fusion") else "trees"
        detail_rows.append(
            [
                name,
                unit,
                h.oof_smape,
                t.oof_smape,
                h.fold_size,
                h.refit_size,
                h.refit_kept,
                t.fold_size,
                t.refit_size,
                t.refit_kept,
            ]
        )
    fold_featurize, refit_featurize = test.featurizer_seconds
    main = table(
        "Refit on all train rows vs the mean of the fold models, per member "
        f"(holdout: {held_rows:,} rows of project fold {args.holdout_fold}, "
        f"{args.folds} re-split folds; test: {train_rows:,} train rows, {test_rows:,} test rows)",
        [
            "member",
            "holdout fold-mean SMAPE",
            "holdout refit SMAPE",
            "holdout agreement",
            "test agreement",
            "test corr",
            "folds s",
            "refit s",
        ],
        main_rows,
        notes=(
            "SMAPE in %. Agreement: SMAPE between the fold-mean and the refit predictions "
            "(0 = identical). Corr: of their log1p predictions on the test rows. Seconds: "
            "training on every train row (boosters without the featurizer: "
            f"{fold_featurize:.1f} s for the {n_folds} fold featurizers, "
            f"{refit_featurize:.1f} s for the refit's)."
        ),
        formats=[None, ".2f", ".2f", ".2f", ".2f", ".4f", ".1f", ".1f"],
    )
    detail = table(
        "Fold models and refits: OOF SMAPE and size (mean best trees or epochs of the fold "
        "models; what the refit ran and kept)",
        [
            "member",
            "unit",
            "holdout OOF SMAPE",
            "all-rows OOF SMAPE",
            "holdout folds",
            "holdout refit ran",
            "holdout refit kept",
            "all-rows folds",
            "all-rows refit ran",
            "all-rows refit kept",
        ],
        detail_rows,
        notes=(
            "Holdout OOF: the re-split folds of the rows outside the held-out fold; all-rows "
            "OOF: the project's folds (the stage's OOF SMAPE). The refit keeps its best round or "
            "epoch on its own training rows."
        ),
        formats=[None, None, ".2f", ".2f", ".1f", "d", "d", ".1f", "d", "d"],
    )
    return [main, detail]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a built project")
    parser.add_argument(
        "--holdout-fold", type=int, default=0, help="project fold held out (default 0)"
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="folds the other rows are re-split into (default 5)"
    )
    add_results_option(parser, "refit_agreement")
    args = parser.parse_args()
    project = args.project.resolve()
    here = Path.cwd()
    os.chdir(project)  # the layout's paths are relative to the project root
    try:
        params = params_from_dict(load_raw(project / "params.yaml"), source=str(project))
        rows = {c: load_stage_rows(params, "train", c) for c in ("gbdt", "fusion")}
        test_rows = {c: load_stage_rows(params, "test", c) for c in ("gbdt", "fusion")}
    finally:
        os.chdir(here)
    y, folds = train_targets(rows["gbdt"].parsed)
    if not np.array_equal(rows["fusion"].parsed["sample_id"], rows["gbdt"].parsed["sample_id"]):
        raise SystemExit("the gbdt and fusion train rows differ in order")
    fold_ids = sorted(set(folds.tolist()))
    if args.holdout_fold not in fold_ids:
        raise SystemExit(f"--holdout-fold {args.holdout_fold}: the project's folds are {fold_ids}")
    fusion_name = f"fusion ({params.fusion.arch})"
    n_folds = len(np.unique(folds))
    print(
        f"project {project}: {len(y):,} train rows in {n_folds} folds, "
        f"{len(test_rows['gbdt'].parsed):,} test rows; boosters {', '.join(params.gbdt.boosters)}, "
        f"{fusion_name}; {available_cores()} cores"
    )

    held = np.flatnonzero(folds == args.holdout_fold)
    rest = np.flatnonzero(folds != args.holdout_fold)
    inner = np.empty(len(rest), dtype=np.int64)
    inner[np.random.default_rng(params.seed).permutation(len(rest))] = (
        np.arange(len(rest)) % args.folds
    )
    started = time.perf_counter()
    holdout = evaluate(
        params,
        {c: take(b, rest) for c, b in rows.items()},
        {c: take(b, held) for c, b in rows.items()},
        y[rest],
        inner,
        fusion_name,
    )
    print(f"holdout run: {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    test = evaluate(params, rows, test_rows, y, folds, fusion_name)
    print(f"test run: {time.perf_counter() - started:.0f} s\n")

    def holdout_smape(pred: np.ndarray) -> float:
        return smape_from_log(y[held], pred)

    out = tables(
        holdout,
        test,
        len(held),
        len(y),
        len(test_rows["gbdt"].parsed),
        holdout_smape,
        args,
        n_folds,
    )
    print("\n\n".join(format_table(t) for t in out))
    if args.results:
        write_results(args.results, out)


if __name__ == "__main__":
    main()
