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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pricefuse.core.config import Params


@dataclass(frozen=True)
class MemberBatch:
    """Rows to predict, as every predictor takes them: parsed table + aligned embeddings."""

    parsed: pd.DataFrame
    text: np.ndarray
    image: np.ndarray
    image_mask: np.ndarray

    def with_columns(self, columns: pd.DataFrame) -> MemberBatch:
        """The same rows with extra (or replaced) parsed columns, aligned by position.

        New columns are joined in one concat: one insert per column (20 neighbour features)
        cost several ms per served request.
        """
        if len(columns) != len(self.parsed):
            raise ValueError(f"{len(columns)} rows of columns for {len(self.parsed)} parsed rows")
        parsed = self.parsed.reset_index(drop=True)
        values = columns.reset_index(drop=True)
        replaced = [name for name in values.columns if name in parsed.columns]
        if replaced:
            parsed = parsed.copy()
            for name in replaced:
                parsed[name] = values[name].to_numpy()
        added = [name for name in values.columns if name not in replaced]
        if added:
            parsed = pd.concat([parsed, values[added]], axis=1)
        return MemberBatch(parsed, self.text, self.image, self.image_mask)


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
        lambda params: tuple(params.gbdt.boosters),
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
