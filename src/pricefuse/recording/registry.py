"""The registry's champion alias and the gate that moves it.

Why a gate: every `ensemble` run registers a new version of `mlflow.registered_model`, but a new
version is not necessarily a better one (a parameter experiment, a smaller data sample). Serving
`models:/<name>@<champion_alias>` rather than `latest` means a worse model is never served by
accident; version URIs (`models:/<name>/3`) keep working for pinning one.

Why out-of-fold predictions: the served models are refit on all train rows, so scoring them on
train rows would be in-sample and favour whichever overfits most. Each ensemble run logs its OOF
table (sample_id, price, prediction; prices, not logs) as `promotion/oof_predictions.parquet`,
and the gate scores both versions with `mlflow.models.evaluate` (static predictions, a SMAPE
metric) on the sample_ids both predicted with the same target price. `pricefuse promote --rows`
instead scores both registered pyfuncs live on labelled rows neither was trained on.

The rule: the candidate takes the alias when its SMAPE is at most the champion's plus
`mlflow.promotion_tolerance` (SMAPE points); with no champion it takes it at once. Every decision
is written on the candidate version (tags, description) and returned for the run's record.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from pricefuse.core.config import Params
from pricefuse.core.layout import ID, PRICE, Layout
from pricefuse.core.metrics import smape
from pricefuse.core.records import StageRecord

OOF_ARTIFACT_DIR = "promotion"
OOF_ARTIFACT_FILE = "oof_predictions.parquet"
PREDICTION = "prediction"
# Below this share of the candidate's OOF rows compared, the two versions were trained on
# different data (another sample, other folds' rows dropped): their SMAPEs say nothing of each
# other, so the gate declines instead of comparing on a sliver.
MIN_OVERLAP = 0.5
# The served model's output column the live comparison (`--rows`) scores.
SERVED_PRICE = "price"
TAG_PREFIX = "promotion."

Outcome = Literal[
    "first champion", "promoted", "kept", "not comparable", "forced", "already champion"
]
MOVES_ALIAS: tuple[Outcome, ...] = ("first champion", "promoted", "forced")


class PromotionError(RuntimeError):
    """The gate cannot run at all (no such model or version, unusable rows): a clear message."""


@dataclass(frozen=True)
class Comparison:
    """Both versions scored on the same rows (`smape_champion` is None when there is none)."""

    rows: int
    smape_candidate: float
    smape_champion: float | None
    basis: str  # "oof" or "rows:<file>"


# A scorer compares the candidate version with the champion version (None: no champion) and
# returns the comparison, or a sentence saying why none can be made.
Scorer = Callable[[str, str | None], Comparison | str]


@dataclass(frozen=True)
class PromotionDecision:
    """What the gate decided for one candidate version, and the evidence: written on the version
    (tags, description), on the run (metrics, tags) and in meta.json, so "why is v7 not
    serving?" is answered where people look."""

    model: str
    alias: str
    candidate: str
    champion_before: str | None
    outcome: Outcome
    reason: str
    tolerance: float
    comparison: Comparison | None = None

    @property
    def moves_alias(self) -> bool:
        return self.outcome in MOVES_ALIAS

    @property
    def champion_after(self) -> str | None:
        return self.candidate if self.moves_alias else self.champion_before

    def describe(self) -> str:
        """One sentence: what happened to the alias and why."""
        before = f"v{self.champion_before}" if self.champion_before else "none"
        head = {
            "first champion": f"version {self.candidate} is the first @{self.alias}",
            "promoted": f"version {self.candidate} promoted to @{self.alias} (was {before})",
            "forced": f"version {self.candidate} FORCED to @{self.alias} (was {before})",
            "kept": f"version {self.candidate} not promoted: @{self.alias} stays {before}",
            "not comparable": f"version {self.candidate} not compared: @{self.alias} stays "
            f"{before}",
            "already champion": f"version {self.candidate} already holds @{self.alias}",
        }[self.outcome]
        return f"{head}; {self.reason}"

    def metrics(self) -> dict[str, float]:
        """For the run: both SMAPEs and the rows compared (when a comparison was made)."""
        if self.comparison is None:
            return {}
        values = {
            "promotion/smape_candidate": self.comparison.smape_candidate,
            "promotion/rows": float(self.comparison.rows),
        }
        if self.comparison.smape_champion is not None:
            values["promotion/smape_champion"] = self.comparison.smape_champion
        return values

    def tags(self) -> dict[str, str]:
        """For the run and the candidate version: the outcome, both champions, the basis."""
        tags = {
            "outcome": self.outcome,
            "reason": self.reason,
            "alias": self.alias,
            "champion_before": self.champion_before or "",
            "champion_after": self.champion_after or "",
            "tolerance": str(self.tolerance),
        }
        if self.comparison is not None:
            tags["basis"] = self.comparison.basis
            tags["rows"] = str(self.comparison.rows)
            tags["smape_candidate"] = f"{self.comparison.smape_candidate:.6g}"
            if self.comparison.smape_champion is not None:
                tags["smape_champion"] = f"{self.comparison.smape_champion:.6g}"
        return {TAG_PREFIX + key: value for key, value in tags.items()}

    def facts(self) -> dict[str, Any]:
        """For meta.json: the whole decision as plain data."""
        facts = asdict(self)
        facts["champion_after"] = self.champion_after
        return facts


def decide(
    model: str,
    alias: str,
    candidate: str,
    champion: str | None,
    comparison: Comparison | str,
    tolerance: float,
    force: bool,
) -> PromotionDecision:
    """The rule, without the registry: not worse than the champion by more than `tolerance`
    SMAPE points -> promoted; no champion -> first champion; `force` overrides a refusal."""
    found = comparison if isinstance(comparison, Comparison) else None
    why_not = comparison if isinstance(comparison, str) else ""

    def made(outcome: Outcome, reason: str) -> PromotionDecision:
        return PromotionDecision(
            model, alias, candidate, champion, outcome, reason, tolerance, found
        )

    if champion == candidate:
        return made("already champion", "nothing to move")
    if champion is None:
        scored = f"SMAPE {found.smape_candidate:.4f} on {found.rows} rows" if found else why_not
        return made("first champion", f"no version held @{alias}; {scored}")
    if found is None or found.smape_champion is None:
        reason = why_not or "the champion could not be scored"
        return made("forced" if force else "not comparable", reason)
    margin = found.smape_candidate - found.smape_champion
    reason = (
        f"SMAPE {found.smape_candidate:.4f} vs the champion's {found.smape_champion:.4f} "
        f"({margin:+.4f}) on the same {found.rows} rows ({found.basis}), "
        f"tolerance {tolerance:g}"
    )
    if margin <= tolerance:
        return made("promoted", reason)
    return made("forced" if force else "kept", reason)


# --- the registry ------------------------------------------------------------------------------


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient()


def champion_version(model: str, alias: str) -> str | None:
    """The version holding `alias`, or None when no version does (or the model is unknown)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(model, alias).version)
    except MlflowException:
        return None


def latest_version(model: str) -> str:
    """The newest version number of `model`."""
    versions = _client().search_model_versions(f"name='{model}'")
    if not versions:
        raise PromotionError(f"no registered versions of {model!r} (run the ensemble stage)")
    return str(max(int(v.version) for v in versions))


def served_model_uri(model: str, alias: str) -> tuple[str, str | None]:
    """`models:/<model>@<alias>` when a version holds the alias, else the newest version with a
    note saying so (a store from before the gate, or one whose first version was not gated)."""
    if champion_version(model, alias) is not None:
        return f"models:/{model}@{alias}", None
    note = (
        f"no version of {model!r} holds the alias @{alias}; using the newest version "
        f"(`pricefuse promote` gives the alias to one)"
    )
    return f"models:/{model}/latest", note


def apply_decision(decision: PromotionDecision) -> None:
    """Move the alias when the decision says so; tag and describe the candidate version."""
    client = _client()
    if decision.moves_alias:
        client.set_registered_model_alias(decision.model, decision.alias, decision.candidate)
    for key, value in decision.tags().items():
        client.set_model_version_tag(decision.model, decision.candidate, key, value)
    client.update_model_version(decision.model, decision.candidate, description=decision.describe())


def promote_version(
    model: str, alias: str, candidate: str, scorer: Scorer, tolerance: float, force: bool
) -> PromotionDecision:
    """Score `candidate` against the alias holder, decide, apply; the decision."""
    from mlflow.exceptions import MlflowException

    try:
        _client().get_model_version(model, candidate)
    except MlflowException as exc:
        raise PromotionError(f"no version {candidate} of {model!r}: {exc.message}") from exc
    champion = champion_version(model, alias)
    comparison: Comparison | str = (
        "nothing to compare" if champion == candidate else scorer(candidate, champion)
    )
    decision = decide(model, alias, candidate, champion, comparison, tolerance, force)
    if decision.outcome != "already champion":  # keep the record of how it got the alias
        apply_decision(decision)
    return decision


# --- scoring -----------------------------------------------------------------------------------


def smape_metric() -> Any:
    """The competition metric as an MLflow evaluation metric (prices, percent, lower is better)."""
    from mlflow.metrics import make_metric

    def smape_fn(predictions: pd.Series, targets: pd.Series, metrics: Any = None) -> float:
        return smape(np.asarray(targets), np.asarray(predictions))

    return make_metric(eval_fn=smape_fn, greater_is_better=False, name="smape")


def import_autolog_flavors() -> list[str]:
    """Import `mlflow.<flavor>` for every autologging flavor whose library this process has
    loaded, before `mlflow.models.evaluate` would; returns the flavors imported.

    Why: evaluate registers its autolog hooks while holding MLflow's import-hook lock, and a hook
    for an already loaded library (torch, transformers, sklearn, ...) imports its mlflow flavor
    module right there. The system-metrics thread of an active run imports too, through the same
    lock, so the two threads can each hold what the other waits for: the ensemble stage of a CI
    run hung there for good. Imported first, outside the lock, those modules are found in
    sys.modules and no thread waits on another."""
    import importlib
    import sys

    from mlflow.ml_package_versions import FLAVOR_TO_MODULE_NAME
    from mlflow.utils.autologging_utils import is_autolog_supported

    imported = []
    for flavor, module in FLAVOR_TO_MODULE_NAME.items():
        if module in sys.modules and is_autolog_supported(flavor):
            try:
                importlib.import_module(f"mlflow.{flavor}")
            except Exception:  # a flavor that cannot import here is skipped by evaluate too
                continue
            imported.append(flavor)
    return imported


def _evaluated(registered: str, version: str, basis: str, **evaluate_args: Any) -> float:
    """`mlflow.models.evaluate` in a run of its own (nested in the active one, if any), so each
    version's figures stay apart; returns the SMAPE."""
    import mlflow

    import_autolog_flavors()
    with mlflow.start_run(run_name=f"promotion: {registered} v{version}", nested=True):
        mlflow.set_tags({TAG_PREFIX + "version": version, TAG_PREFIX + "basis": basis})
        result = mlflow.models.evaluate(
            model_type="regressor",
            extra_metrics=[smape_metric()],
            evaluator_config={"log_model_explainability": False},
            **evaluate_args,
        )
    return float(result.metrics["smape"])


def oof_table(layout: Layout) -> pd.DataFrame:
    """The ensemble's OOF predictions as prices beside the targets: sample_id, price, prediction."""
    from pricefuse.models.ensemble.blend import to_price
    from pricefuse.pipeline.inputs import load_parsed

    oof = pd.read_parquet(layout.oof_predictions("ensemble"))
    train = load_parsed(layout, "train")[[ID, PRICE]]
    table = oof[[ID, "ensemble"]].merge(train, on=ID, how="inner", validate="one_to_one")
    if len(table) != len(oof):
        raise PromotionError(
            f"{len(oof) - len(table)} OOF rows of the ensemble have no parsed train row"
        )
    table[PREDICTION] = to_price(table.pop("ensemble").to_numpy())
    return table[[ID, PRICE, PREDICTION]]


def log_oof_table(table: pd.DataFrame, run_id: str) -> None:
    """Store the OOF table on the run that registered the version (the gate's evidence)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / OOF_ARTIFACT_FILE
        table.to_parquet(path, index=False)
        _client().log_artifact(run_id, str(path), OOF_ARTIFACT_DIR)


def load_oof_table(model: str, version: str) -> pd.DataFrame | None:
    """The OOF table of the run that registered `version`; None when that run logged none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = _client().get_model_version(model, version).run_id
    if not run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{OOF_ARTIFACT_DIR}/{OOF_ARTIFACT_FILE}", dst_path=tmp
            )
            return pd.read_parquet(path)
    except (MlflowException, OSError):
        return None


def common_rows(candidate: pd.DataFrame, champion: pd.DataFrame) -> pd.DataFrame:
    """Rows both tables predicted with the same target: sample_id, price, candidate, champion."""
    both = candidate.merge(champion, on=ID, suffixes=("_candidate", "_champion"))
    same = np.isclose(both[f"{PRICE}_candidate"], both[f"{PRICE}_champion"], rtol=1e-9, atol=0)
    both = both[same]
    return pd.DataFrame(
        {
            ID: both[ID].to_numpy(),
            PRICE: both[f"{PRICE}_candidate"].to_numpy(),
            "candidate": both[f"{PREDICTION}_candidate"].to_numpy(),
            "champion": both[f"{PREDICTION}_champion"].to_numpy(),
        }
    )


def oof_scorer(model: str, known: Mapping[str, pd.DataFrame] | None = None) -> Scorer:
    """Compare two versions on their logged OOF predictions (`known`: tables already in hand,
    by version, e.g. the one the running ensemble stage just computed)."""
    known = dict(known or {})

    def table(version: str) -> pd.DataFrame | None:
        return known[version] if version in known else load_oof_table(model, version)

    def score(candidate: str, champion: str | None) -> Comparison | str:
        mine = table(candidate)
        if mine is None:
            return f"version {candidate}'s run logged no OOF table ({OOF_ARTIFACT_DIR}/)"
        if champion is None:
            value = _evaluated(
                model, candidate, "oof", data=mine, targets=PRICE, predictions=PREDICTION
            )
            return Comparison(len(mine), value, None, "oof")
        theirs = table(champion)
        if theirs is None:
            return (
                f"the champion (version {champion}) has no OOF table: registered before the "
                f"gate existed; compare on held-out rows with `pricefuse promote --rows`"
            )
        rows = common_rows(mine, theirs)
        if len(rows) < MIN_OVERLAP * len(mine):
            return (
                f"only {len(rows)} of the candidate's {len(mine)} OOF rows were also predicted "
                f"by version {champion} with the same price (need {MIN_OVERLAP:.0%}): trained "
                f"on other data"
            )
        values = [
            _evaluated(model, version, "oof", data=rows, targets=PRICE, predictions=column)
            for version, column in ((candidate, "candidate"), (champion, "champion"))
        ]
        return Comparison(len(rows), values[0], values[1], "oof")

    return score


def rows_scorer(model: str, rows: pd.DataFrame, label: str) -> Scorer:
    """Compare two versions by running both registered pyfuncs on labelled `rows` (a `price`
    column plus the served model's inputs) that neither was trained on."""
    from pricefuse.serving.inputs import INPUT_ID, INPUT_IMAGE_B64, INPUT_IMAGE_LINK, INPUT_TEXT

    inputs = [c for c in (INPUT_ID, INPUT_TEXT, INPUT_IMAGE_LINK, INPUT_IMAGE_B64) if c in rows]
    data = rows[[*inputs, PRICE]].copy()
    for column in (INPUT_TEXT, INPUT_IMAGE_LINK, INPUT_IMAGE_B64):
        if column in data:
            data[column] = data[column].fillna("").astype(str)
    basis = f"rows:{label}"

    def live(version: str) -> float:
        uri = f"models:/{model}/{version}"
        args = {"model": uri, "data": data, "targets": PRICE, "predictions": SERVED_PRICE}
        return _evaluated(model, version, basis, env_manager="local", **args)

    def score(candidate: str, champion: str | None) -> Comparison | str:
        return Comparison(
            len(data), live(candidate), None if champion is None else live(champion), basis
        )

    return score


def read_labelled_rows(path: Path) -> pd.DataFrame:
    """A labelled CSV for `promote --rows`: the served model's inputs and a finite `price`."""
    from pricefuse.serving.inputs import INPUT_TEXT

    try:
        rows = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PromotionError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in (INPUT_TEXT, PRICE) if c not in rows.columns]
    if missing:
        raise PromotionError(f"{path}: missing column(s) {', '.join(missing)}")
    price = pd.to_numeric(rows[PRICE], errors="coerce")
    bad = ~np.isfinite(price) | (price <= 0)
    if bad.any():
        raise PromotionError(f"{path}: {int(bad.sum())} rows have no positive finite price")
    if rows.empty:
        raise PromotionError(f"{path}: no rows")
    rows[PRICE] = price.astype(np.float64)
    return rows


# --- entry points --------------------------------------------------------------------------------


def gate_ensemble_run(
    params: Params, layout: Layout, registered: Mapping[str, Any], result: StageRecord
) -> None:
    """The ensemble stage's one call: log this run's OOF table, gate the version it registered
    against the champion, and add the decision to the stage's record (metrics, tags, meta.json,
    summary). Nothing to gate when `ensemble.register` is off."""
    import mlflow

    table = oof_table(layout)
    log_oof_table(table, mlflow.active_run().info.run_id)
    version = registered.get("registered_version")
    if version is None:
        return
    cfg = params.mlflow
    scorer = oof_scorer(cfg.registered_model, {str(version): table})
    decision = promote_version(
        cfg.registered_model,
        cfg.champion_alias,
        str(version),
        scorer,
        cfg.promotion_tolerance,
        force=False,
    )
    result.metrics.update(decision.metrics())
    result.tags.update(decision.tags())
    result.meta.setdefault(layout.model_dir("ensemble"), {})["promotion"] = decision.facts()
    result.summary += f"\npromotion: {decision.describe()}"


def promote_command(
    params: Params, version: str | None, rows_csv: Path | None, force: bool
) -> PromotionDecision:
    """`pricefuse promote`: gate `version` (default: the newest) on its OOF predictions, or on
    labelled rows with both pyfuncs live; a run named `promote` records the decision."""
    import mlflow

    from pricefuse.recording import tracking

    cfg = params.mlflow
    tracking.configure(cfg.experiment)
    candidate = str(version) if version is not None else latest_version(cfg.registered_model)
    if rows_csv is not None:
        scorer = rows_scorer(cfg.registered_model, read_labelled_rows(rows_csv), rows_csv.name)
    else:
        scorer = oof_scorer(cfg.registered_model)
    with mlflow.start_run(run_name="promote"):
        decision = promote_version(
            cfg.registered_model,
            cfg.champion_alias,
            candidate,
            scorer,
            cfg.promotion_tolerance,
            force,
        )
        mlflow.set_tags({**decision.tags(), TAG_PREFIX + "candidate": candidate})
        if decision.metrics():
            mlflow.log_metrics(decision.metrics())
    return decision
