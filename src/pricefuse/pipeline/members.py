"""The ensemble's members, declared once.

A *member* is one column of log1p predictions (`fusion`, `lightgbm`, `linear`, `knn`, ...). A
*producer* is the training stage that writes some members into one model directory: OOF and test
predictions (`layout.oof_predictions(name)`, `layout.test_predictions(name)`) plus whatever its
predictor needs to answer for new rows. The ensemble, the reports, the plots, the prediction
loader and the served model all read this registry and `ensemble.members` in params.yaml; none
keeps a list of its own. A new member is one library module, one stage and one entry here.

The registry holds names only. Which class answers for a producer's model directory lives in
`pricefuse.models.predictors`, imported by the stages that load predictors (ensemble, ablation,
submit) and by serving: a stage that only reads parsed rows or embeddings must not have every
member's code in its import closure, or editing a booster would make DVC re-run the embedding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pricefuse.core.config import Params


@dataclass(frozen=True)
class MemberBatch:
    """Rows to predict, as every predictor takes them: parsed table + aligned embeddings.

    The table is `base` plus `arrays`: numeric columns joined through `with_arrays` (neighbour
    features, stacked member predictions, as the served model adds them) are kept as the
    float64 arrays they are, and `parsed`, the full table, joins them to `base` on first use.
    Why: joining ~20 columns to a one-row table cost a served row about a millisecond per join,
    and a predictor that knows where a column lives (`base` for parsed fields, `arrays` for the
    joined numbers) never needs the join; any other reader still gets every column from
    `parsed`. The names in `arrays` are never columns of `base`.

    `llm`: the opt-in LLM text block (pricefuse.features.llm; standardised, one row per row),
    None when `embed.llm` is off. Every batch derived from this one carries it.
    """

    base: pd.DataFrame
    text: np.ndarray
    image: np.ndarray
    image_mask: np.ndarray
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    llm: np.ndarray | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def parsed(self) -> pd.DataFrame:
        """The whole table: `base` with the `arrays` joined as columns (built once, on first
        use; `base` itself when there are none)."""
        if not self.arrays:
            return self.base
        names = list(self.arrays)
        joined = pd.DataFrame(np.column_stack([self.arrays[n] for n in names]), columns=names)
        return pd.concat([_positional(self.base), joined], axis=1)

    def column_names(self) -> set[str]:
        """The names of the whole table's columns, without joining it."""
        return {*self.base.columns, *self.arrays}

    def with_columns(self, columns: pd.DataFrame) -> MemberBatch:
        """The same rows with extra (or replaced) columns, aligned by position.

        New columns are joined in one concat: one insert per column (20 neighbour features)
        cost several ms per served request. Frames already indexed 0..n-1 (as the served model's
        and the stages' are) are taken as they are rather than re-indexed. A column that
        replaces one of `arrays` leaves `arrays`.
        """
        if len(columns) != len(self.base):
            raise ValueError(f"{len(columns)} rows of columns for {len(self.base)} parsed rows")
        parsed = _positional(self.base)
        values = _positional(columns)
        replaced = [name for name in values.columns if name in parsed.columns]
        if replaced:
            parsed = parsed.copy()
            for name in replaced:
                parsed[name] = values[name].to_numpy()
        added = [name for name in values.columns if name not in replaced]
        if added:
            parsed = pd.concat([parsed, values if not replaced else values[added]], axis=1)
        kept = {name: v for name, v in self.arrays.items() if name not in values.columns}
        return MemberBatch(parsed, self.text, self.image, self.image_mask, kept, self.llm)

    def with_arrays(self, arrays: Mapping[str, np.ndarray]) -> MemberBatch:
        """The same rows with extra (or replaced) numeric columns given as arrays (one value per
        row, kept as float64), added to `arrays` without joining them to the table."""
        values = {name: np.asarray(v, dtype=np.float64) for name, v in arrays.items()}
        if any(v.shape != (len(self.base),) for v in values.values()):
            raise ValueError(f"arrays of {len(self.base)} values expected for {list(values)}")
        base = self.base
        shadowed = [name for name in values if name in base.columns]
        if shadowed:
            base = base.drop(columns=shadowed)
        arrays = {**self.arrays, **values}
        return MemberBatch(base, self.text, self.image, self.image_mask, arrays, self.llm)


def _positional(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` indexed 0..n-1: itself when it already is, else `reset_index(drop=True)`."""
    index = frame.index
    if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
        return frame
    return frame.reset_index(drop=True)


@dataclass(frozen=True)
class Producer:
    """A training stage, the model directory it writes, and the members it predicts."""

    name: str  # directory under data.models_dir, and the served model's artifact key
    stage: str  # the dvc stage / `pricefuse` subcommand that writes it
    members: Callable[[Params], tuple[str, ...]]
    feeds_features: bool = False


PRODUCERS: tuple[Producer, ...] = (
    Producer(
        "neighbours",
        "neighbours",
        lambda params: ("knn",),
        feeds_features=True,
    ),
    Producer(
        "linear",
        "train_linear",
        lambda p: ("linear",),
    ),
    # Before the heads that may stack its predictions (`<consumer>.stack_members`): it reads only
    # the parsed rows.
    Producer(
        "text",
        "train_text",
        lambda p: ("text",),
    ),
    Producer(
        "fusion",
        "train_fusion",
        lambda p: ("fusion",),
    ),
    Producer(
        "gbdt",
        "train_gbdt",
        # one per booster, then the `_unit` and `_own` variants (GbdtConfig.members)
        lambda params: params.gbdt.members,
    ),
)


class UnknownMemberError(ValueError):
    """A member name no producer writes (with the known ones in the message)."""


def producer_of(member: str, params: Params) -> Producer:
    for producer in PRODUCERS:
        if member in producer.members(params):
            return producer
    known = [m for p in PRODUCERS for m in p.members(params)]
    raise UnknownMemberError(
        f"unknown ensemble member {member!r}; members the stages produce: {', '.join(known)}"
    )


def selected_members(params: Params) -> tuple[str, ...]:
    """`ensemble.members`, checked against the registry (duplicates and unknowns are errors)."""
    members = tuple(params.ensemble.members)
    if not members:
        raise UnknownMemberError("ensemble.members is empty")
    duplicates = sorted({m for m in members if members.count(m) > 1})
    if duplicates:
        raise UnknownMemberError(f"ensemble.members lists {duplicates} more than once")
    for member in members:
        producer_of(member, params)
    return members


STACKED_PREFIX = "member_"


def stacked_column(member: str) -> str:
    """The table column under which a member's prediction feeds a later producer."""
    return f"{STACKED_PREFIX}{member}"


def stack_members_of(params: Params, consumer: str) -> tuple[str, ...]:
    """The members whose predictions producer `consumer` takes as features (its params
    section's `stack_members`; none when the section has no such key)."""
    return tuple(getattr(getattr(params, consumer, None), "stack_members", ()))


def check_stack_members(params: Params, consumer: str) -> tuple[str, ...]:
    """`<consumer>.stack_members`, checked: members of producers that run before `consumer`."""
    order = [p.name for p in PRODUCERS]
    members = stack_members_of(params, consumer)
    for member in members:
        producer = producer_of(member, params)
        if order.index(producer.name) >= order.index(consumer):
            raise UnknownMemberError(
                f"{member!r} cannot feed {consumer}: its producer {producer.name} runs after it"
            )
    return members


def serving_producers(params: Params) -> list[Producer]:
    """The producers the served model loads, in prediction order: feature providers first,
    then the producers of the selected members and of the members stacked into them."""
    needed = {producer_of(m, params).name for m in selected_members(params)}
    if params.neighbours.as_features:
        needed |= {p.name for p in PRODUCERS if p.feeds_features}
    for consumer in list(needed):
        needed |= {producer_of(m, params).name for m in check_stack_members(params, consumer)}
    return [p for p in PRODUCERS if p.name in needed]
