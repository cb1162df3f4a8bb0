"""`pricefuse compare`: one table and one plot of a metric (OOF SMAPE) per architecture / loss
over the runs of one stage in an MLflow experiment.

Why: every `mlflow run . -e train_fusion -P arch=...` logs one run with its params flattened
under dotted keys (`fusion.arch`) and its metrics (`smape_oof`, `smape_fold_k`,
`train_seconds`), so the comparison is a group-by over `mlflow.search_runs`; nothing is trained
or logged here.

Same folds only. An OOF score is comparable with another only when both were computed on the
same rows split the same way. The folds are a function of the raw data (tag `data_md5`), the
`seed` and the `preprocess.*` params (`n_folds`, and the row filters and text cleaning that
decide which rows exist and which fold keys group them), so those values form a run's *fold
set* (a short hash of them). The comparison never puts runs of different fold sets in one
group: by default it keeps only the fold set of the newest run (the data the user trains on now)
and says how many runs it left out; `--all-runs` shows every fold set as its own block, each
sorted best first, with its id in the table and the plot. A run that lacks one of those values
(logged by hand) gets "(unset)" for it, so it never joins a fold set it may not belong to.

The pure parts (`compare_runs`: runs frame -> `Comparison`; `figure`: `Comparison` -> matplotlib
figure) are separate from the MLflow query (`load_runs`) and from writing (`write_outputs`).
Lower metric values are better (SMAPE).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

UNSET = "(unset)"
DEFAULT_BY = ("fusion.arch", "fusion.loss")
DEFAULT_STAGE = "train_fusion"
DEFAULT_METRIC = "smape_oof"
DEFAULT_OUT = Path("reports/compare")
# How groups are ordered: by their best run, or by the mean over their runs (repeated runs of one
# configuration with other training seeds: a lucky seed should not decide the default).
RANKS = ("best", "mean")
LEGEND_INCHES = 0.5
CSV_NAME = "compare.csv"
PNG_NAME = "compare.png"
FOLD_METRIC_PREFIX = "smape_fold_"
TIME_METRIC = "train_seconds"
# What decides the folds (module docstring): the raw data's md5, the seed, every preprocess.* param.
DATA_TAG = "tags.data_md5"
SEED_PARAM = "params.seed"
PREPROCESS_PREFIX = "params.preprocess."


class CompareError(ValueError):
    """The comparison cannot be made; the message says why and what there is instead."""


@dataclass(frozen=True)
class Comparison:
    """One row per (fold set, --by values) group, best first within each fold set.

    `table` columns: `fold_set`, the `by` keys, `runs`, `<metric>_best` / `_mean` / `_std`
    over the group's runs, `fold_mean` / `fold_std` / `fold_count` of the best run's
    `smape_fold_k` metrics (NaN / 0 where it logged none), `train_seconds` (mean over the runs,
    NaN where none logged it) and `best_run_id`. `best_folds` holds the best run's per-fold
    values, for the plot. `fold_sets` describes each fold set shown (id, data_md5, n_folds,
    seed, runs).
    """

    stage: str
    metric: str
    by: tuple[str, ...]
    table: pd.DataFrame
    best_folds: tuple[tuple[float, ...], ...]
    fold_sets: pd.DataFrame
    left_out_other_folds: int
    left_out_no_metric: int

    def header(self) -> str:
        """What the table compares and on which folds: printed above it and kept in the CSV's
        companion text, since a SMAPE means nothing without its folds."""
        lines = [
            f"{self.metric} of FINISHED `{self.stage}` runs by {' / '.join(self.by)} "
            f"(lower is better; best run, mean and std over runs; folds: the best run's "
            f"{FOLD_METRIC_PREFIX}k mean±std)."
        ]
        for row in self.fold_sets.itertuples(index=False):
            lines.append(
                f"fold set {row.fold_set}: data_md5 {row.data_md5}, preprocess.n_folds "
                f"{row.n_folds}, seed {row.seed} ({_runs(row.runs)})"
            )
        if len(self.fold_sets) > 1:
            lines.append("Only rows of the same fold set are comparable.")
        if self.left_out_other_folds:
            lines.append(
                f"Left out: {_runs(self.left_out_other_folds)} on other folds (other data, seed "
                "or preprocess params); --all-runs shows them as separate blocks."
            )
        if self.left_out_no_metric:
            lines.append(f"Left out: {_runs(self.left_out_no_metric)} without {self.metric}.")
        return "\n".join(lines)

    def to_text(self) -> str:
        """The header and the table, formatted for a terminal."""
        shown = pd.DataFrame({"fold_set": self.table["fold_set"]})
        for key in self.by:
            shown[key] = self.table[key]
        shown["runs"] = self.table["runs"]
        for stat in ("best", "mean", "std"):
            shown[stat] = self.table[f"{self.metric}_{stat}"].map(_fmt)
        folds = self.table[["fold_mean", "fold_std", "fold_count"]].itertuples(index=False)
        shown["folds"] = [f"{_fmt(m)}±{_fmt(s)} ({n})" if n else "-" for m, s, n in folds]
        shown["train_s"] = self.table[TIME_METRIC].map(lambda v: _fmt(v, 0))
        shown["best_run_id"] = self.table["best_run_id"]
        if len(self.fold_sets) == 1:
            shown = shown.drop(columns="fold_set")
        return self.header() + "\n\n" + shown.to_string(index=False)


def _runs(count: int) -> str:
    return f"{count} run{'' if count == 1 else 's'}"


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


# ---- runs frame -> Comparison --------------------------------------------------------------


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    """A column as strings, UNSET where the run has no value (or the frame no column)."""
    if name not in runs.columns:
        return pd.Series(UNSET, index=runs.index, dtype=object)
    return runs[name].map(lambda v: UNSET if v is None or v != v or v == "" else str(v))


def fold_set_ids(runs: pd.DataFrame) -> pd.Series:
    """Each run's fold set: a short hash of its data_md5 tag, seed and every preprocess.* param
    (the values that decide the folds; module docstring)."""
    preprocess = sorted(c for c in runs.columns if c.startswith(PREPROCESS_PREFIX))
    keys = [DATA_TAG, SEED_PARAM, *preprocess]
    parts = pd.DataFrame({key: _column(runs, key) for key in keys}, index=runs.index)
    text = parts.apply(lambda row: "\x1f".join(f"{k}={v}" for k, v in row.items()), axis=1)
    return text.map(lambda t: hashlib.md5(t.encode()).hexdigest()[:8])


def _param_keys(runs: pd.DataFrame) -> list[str]:
    return sorted(c[len("params.") :] for c in runs.columns if c.startswith("params."))


def check_by(runs: pd.DataFrame, by: Sequence[str], known: Sequence[str] = ()) -> tuple[str, ...]:
    """The --by keys without a `params.` prefix; CompareError for a key that no run logged and
    `known` (the params.yaml keys: a param added after these runs shows as UNSET) lacks."""
    keys = tuple(dict.fromkeys(key.removeprefix("params.") for key in by))
    if not keys:
        raise CompareError("give at least one --by param, e.g. --by fusion.arch")
    logged = _param_keys(runs)
    for key in keys:
        if key in logged or key in known:
            continue
        close = difflib.get_close_matches(key, logged, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        varying = [k for k in logged if runs[f"params.{k}"].astype(str).nunique(dropna=False) > 1]
        section = key.split(".", 1)[0] + "."
        same_section = [k for k in logged if k.startswith(section)]
        listed = (
            f"{section}* params the runs have: {', '.join(same_section)}"
            if same_section
            else f"all params the runs have: {', '.join(logged)}"
        )
        raise CompareError(
            f"unknown --by param {key!r}: none of these runs logged it.{hint}\n"
            f"params that differ between the runs: {', '.join(varying) or '(none)'}\n{listed}"
        )
    return keys


def _metric_names(runs: pd.DataFrame) -> list[str]:
    return sorted(
        c[len("metrics.") :]
        for c in runs.columns
        if c.startswith("metrics.") and not c.startswith("metrics.system/")
    )


def _fold_columns(runs: pd.DataFrame) -> list[str]:
    """metrics.smape_fold_<k> columns in fold order."""
    prefix = f"metrics.{FOLD_METRIC_PREFIX}"
    folds = [c for c in runs.columns if c.startswith(prefix) and c[len(prefix) :].isdigit()]
    return sorted(folds, key=lambda c: int(c[len(prefix) :]))


def compare_runs(
    runs: pd.DataFrame,
    stage: str = DEFAULT_STAGE,
    by: Sequence[str] = DEFAULT_BY,
    metric: str = DEFAULT_METRIC,
    all_runs: bool = False,
    known_params: Sequence[str] = (),
    rank: str = "best",
) -> Comparison:
    """Group the runs (one stage's FINISHED runs, as `mlflow.search_runs` returns them) by fold
    set and the `by` params; CompareError when there are none, a `by` key is unknown (neither
    logged nor in `known_params`) or no run has the metric."""
    if rank not in RANKS:
        raise CompareError(f"rank must be one of {', '.join(RANKS)}, got {rank!r}")
    if runs.empty:
        raise CompareError(f"no FINISHED runs of stage {stage}")
    keys = check_by(runs, by, known_params)
    column = f"metrics.{metric}"
    if column not in runs.columns or runs[column].isna().all():
        raise CompareError(
            f"no {stage} run has the metric {metric!r}; their metrics: "
            f"{', '.join(_metric_names(runs)) or '(none)'}"
        )
    with_metric = runs[runs[column].notna()].copy()
    with_metric["_fold_set"] = fold_set_ids(with_metric)
    newest_first = with_metric.sort_values("start_time", ascending=False, kind="stable")
    order = list(dict.fromkeys(newest_first["_fold_set"]))
    kept = (with_metric if all_runs else with_metric[with_metric["_fold_set"] == order[0]]).copy()
    order = [f for f in order if f in set(kept["_fold_set"])]
    for key in keys:
        kept[key] = _column(kept, f"params.{key}")

    fold_columns = _fold_columns(kept)
    rows: list[dict[str, Any]] = []
    best_folds: list[tuple[float, ...]] = []
    for (fold_set, *values), group in kept.groupby(["_fold_set", *keys], sort=False):
        scores = group[column].astype(float)
        best = group.loc[scores.idxmin()]
        folds = tuple(float(best[c]) for c in fold_columns if pd.notna(best[c]))
        seconds = group.get(f"metrics.{TIME_METRIC}")
        rows.append(
            {
                "fold_set": fold_set,
                **dict(zip(keys, values, strict=True)),
                "runs": len(group),
                f"{metric}_best": float(scores.min()),
                f"{metric}_mean": float(scores.mean()),
                f"{metric}_std": float(scores.std()) if len(group) > 1 else float("nan"),
                "fold_mean": float(np.mean(folds)) if folds else float("nan"),
                "fold_std": float(np.std(folds, ddof=1)) if len(folds) > 1 else float("nan"),
                "fold_count": len(folds),
                TIME_METRIC: float(seconds.mean()) if seconds is not None else float("nan"),
                "best_run_id": best["run_id"],
            }
        )
        best_folds.append(folds)
    table = pd.DataFrame(rows)
    table["_block"] = table["fold_set"].map(order.index)
    table["_folds"] = best_folds
    table = table.sort_values(
        ["_block", f"{metric}_{rank}", f"{metric}_{RANKS[1 - RANKS.index(rank)]}"],
        kind="stable",
    ).reset_index(drop=True)
    return Comparison(
        stage=stage,
        metric=metric,
        by=keys,
        table=table.drop(columns=["_block", "_folds"]),
        best_folds=tuple(table["_folds"]),
        fold_sets=_describe_fold_sets(kept, order),
        left_out_other_folds=len(with_metric) - len(kept),
        left_out_no_metric=len(runs) - len(with_metric),
    )


def _describe_fold_sets(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    first = runs.groupby("_fold_set", sort=False).first()
    counts = runs["_fold_set"].value_counts()
    return pd.DataFrame(
        {
            "fold_set": order,
            "data_md5": [_column(first, DATA_TAG)[f] for f in order],
            "n_folds": [_column(first, f"{PREPROCESS_PREFIX}n_folds")[f] for f in order],
            "seed": [_column(first, SEED_PARAM)[f] for f in order],
            "runs": [int(counts[f]) for f in order],
        }
    )


# ---- Comparison -> figure ------------------------------------------------------------------


def figure(comparison: Comparison) -> Any:
    """Horizontal dot plot, one row per group, best at the top: the best run's metric (filled
    dot, labelled), the mean over the group's runs (diamond, when it has several), that run's
    per-fold values (small grey marks) and their mean±std (bar).
    Fold-set blocks are separated by a line and carry their id when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = comparison.table
    several = len(comparison.fold_sets) > 1
    labels = [
        " / ".join(str(row[key]) for key in comparison.by)
        + (f"  [{row['fold_set']}]" if several else "")
        for _, row in table.iterrows()
    ]
    ys = np.arange(len(table))
    height = 0.45 * len(table) + 2.4
    fig, ax = plt.subplots(figsize=(7.5, height), dpi=110)
    fold_x = [x for folds in comparison.best_folds for x in folds]
    fold_y = [y for y, folds in zip(ys, comparison.best_folds, strict=True) for _ in folds]
    if fold_x:
        ax.scatter(fold_x, fold_y, marker="|", s=60, color="grey", label="best run's folds")
    has_spread = table["fold_std"].notna()
    ax.errorbar(
        table.loc[has_spread, "fold_mean"],
        ys[has_spread.to_numpy()],
        xerr=table.loc[has_spread, "fold_std"],
        fmt="none",
        ecolor="lightsteelblue",
        elinewidth=6,
        zorder=1,
        label="best run: folds mean±std",
    )
    best = table[f"{comparison.metric}_best"]
    mean = table[f"{comparison.metric}_mean"]
    repeated = (table["runs"] > 1).to_numpy()
    if repeated.any():
        ax.scatter(
            mean[repeated],
            ys[repeated],
            marker="D",
            s=22,
            color="black",
            zorder=4,
            label=f"mean {comparison.metric} over the runs",
        )
    ax.scatter(best, ys, color="crimson", zorder=3, label=f"best run's {comparison.metric}")
    for y, value, average, runs in zip(ys, best, mean, table["runs"], strict=True):
        text = f"best {value:.2f}, mean {average:.2f}" if runs > 1 else f"{value:.2f}"
        ax.annotate(
            f"{text} ({_runs(runs)})",
            (value, y),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    starts = table.index[table["fold_set"] != table["fold_set"].shift()].tolist()[1:]
    for start in starts:
        ax.axhline(start - 0.5, color="black", linewidth=0.6)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_ylim(len(table) - 0.5, -0.7)  # best (row 0) at the top
    ax.set_xlabel(f"{comparison.metric} (lower is better)")
    folds = ", ".join(comparison.fold_sets["fold_set"])
    ax.set_title(
        f"{comparison.stage}: {comparison.metric} by {' / '.join(comparison.by)}\n"
        f"fold set{'s' if several else ''} {folds}",
        fontsize=9,
    )
    ax.grid(True, axis="x", alpha=0.25)
    # The legend in its own strip at the bottom (half an inch), never over the axis label.
    fig.legend(fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, LEGEND_INCHES / height, 1, 1))
    return fig


def write_outputs(comparison: Comparison, out_dir: Path | str) -> tuple[Path, Path]:
    """compare.csv (the table) and compare.png (the figure) in `out_dir`."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / CSV_NAME, out / PNG_NAME
    comparison.table.to_csv(csv_path, index=False)
    fig = figure(comparison)
    fig.savefig(png_path)
    plt.close(fig)
    return csv_path, png_path


# ---- MLflow -> runs frame ------------------------------------------------------------------


def load_runs(experiment: str, stage: str, tracking_uri: str) -> pd.DataFrame:
    """The FINISHED runs of `stage` (tag `stage`) in the experiment, as `mlflow.search_runs`
    returns them; CompareError naming the experiments there, or the stages with finished runs,
    when there is no such experiment or no such run. Reads only."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(
            f"no MLflow experiment named {experiment!r} at {tracking_uri}; experiments there: "
            f"{', '.join(names) or '(none)'}. (`mlflow run` logs into `Default` unless given "
            "--experiment-name.)"
        )
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(
        experiment_ids=[found.experiment_id],
        filter_string=f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
        output_format="pandas",
    )
    if runs.empty:
        everything = mlflow.search_runs(
            experiment_ids=[found.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            output_format="pandas",
        )
        stages = (
            everything["tags.stage"].value_counts().to_dict() if "tags.stage" in everything else {}
        )
        there = ", ".join(f"{name} ({count})" for name, count in sorted(stages.items()))
        raise CompareError(
            f"no FINISHED runs of stage {stage!r} in experiment {experiment!r}; finished runs "
            f"by stage there: {there or '(none)'}"
        )
    return runs
