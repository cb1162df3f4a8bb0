"""Ablation: what each member and each modality contributes, measured out of fold.

Three questions, one table: how good is each member alone; how much worse is the fitted blend
without it (its marginal value to the ensemble); and how does the fusion head do on text only,
image only, tabular only and everything (seed write-up 003 compared text, image and both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
from tqdm import tqdm

from pricefuse.core import records
from pricefuse.core.config import FusionConfig
from pricefuse.core.errors import StageError
from pricefuse.core.metrics import smape
from pricefuse.core.records import StageRecord
from pricefuse.models.ensemble.blend import fit_blend_weights, leave_one_out, to_price
from pricefuse.models.fusion.inputs import MODALITY_GROUPS, SplitData
from pricefuse.models.fusion.training import train_kfold

FUSION_VARIANTS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "image": ("image",),
    "tabular": ("tabular",),
    "all": MODALITY_GROUPS,
}
TITLE = "Ablation: OOF SMAPE (%), lower is better"


def ablation_key(group: str, name: str) -> str:
    """The metric key of one ablation row: `<group>/<name>`, spaces as underscores."""
    return f"{group.replace(' ', '_')}/{name.replace(' ', '_')}"


def member_table(members_oof: np.ndarray, names: Sequence[str], y_log: np.ndarray) -> pd.DataFrame:
    """Rows: `member` (alone) and `ensemble without` each member, plus the full blend."""
    x = np.asarray(members_oof, dtype=np.float64)
    y = np.expm1(np.asarray(y_log, dtype=np.float64))
    rows = [
        {"group": "member alone", "name": n, "smape_oof": smape(y, to_price(x[:, i]))}
        for i, n in enumerate(names)
    ]
    full = smape(y, to_price(fit_blend_weights(x, y_log, names).apply(x)))
    rows.append({"group": "blend", "name": "all members", "smape_oof": full})
    rows += [
        {"group": "blend without", "name": n, "smape_oof": s}
        for n, s in leave_one_out(x, names, y_log).items()
    ]
    return pd.DataFrame(rows)


def fusion_modality_table(
    train: SplitData,
    cfg: FusionConfig,
    seed: int,
    variants: Sequence[str],
    on_variant: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """OOF SMAPE of the fusion head trained on each modality subset (same folds, same params)."""
    rows = []
    y = np.expm1(train.target)
    for label in variants:
        modalities = FUSION_VARIANTS[label]
        result = train_kfold(train, replace(cfg, modalities=modalities), seed)
        name = "all" if label == "all" else f"{label} only"
        rows.append(
            {"group": "fusion head", "name": name, "smape_oof": smape(y, to_price(result.oof))}
        )
        if on_variant is not None:
            on_variant(label)
    return pd.DataFrame(rows)


def sample_rows(train: SplitData, max_rows: int, seed: int) -> SplitData:
    """At most `max_rows` rows of `train` (all when max_rows is 0 or not smaller), drawn at
    random in their original order; each row keeps its fold, so the folds stay leak-free."""
    if max_rows < 0:
        raise StageError(f"ablation.max_rows must be >= 0 (0 = every row), got {max_rows}")
    if max_rows == 0 or len(train) <= max_rows:
        return train
    rows = np.sort(np.random.default_rng(seed).choice(len(train), size=max_rows, replace=False))
    mask = np.asarray(train.image_mask, dtype=bool)
    return SplitData(
        train.frame.iloc[rows].reset_index(drop=True),
        train.text[rows],
        train.image[rows],
        mask[rows],
    )


def run_ablation(
    cfg: FusionConfig,
    seed: int,
    variants: Sequence[str],
    train: SplitData,
    members_oof: np.ndarray,
    members: Sequence[str],
    max_rows: int = 0,
) -> StageRecord:
    """The `ablation` stage's work: the member table over `members_oof` (columns in `members`
    order, rows in `train` order) and the fusion head retrained on each of `variants`, on at
    most `max_rows` of the rows (`sample_rows`).

    The rows become `<group>/<name>` metrics (`ablation_key`): the stage's
    metrics file (metrics/ablation.json, which DVC shows and diffs) mirrors them, and
    `pricefuse evaluate` reads the table back from it.
    """
    unknown = sorted(set(variants) - set(FUSION_VARIANTS))
    if unknown:
        raise StageError(
            f"ablation.fusion_variants: unknown {unknown}; known: {', '.join(FUSION_VARIANTS)}"
        )
    table = member_table(members_oof, members, train.target)
    sample = sample_rows(train, max_rows, seed)
    with tqdm(total=len(variants), desc="fusion variants", disable=None) as bar:
        try:
            fusion = fusion_modality_table(sample, cfg, seed, variants, lambda label: bar.update())
        except ValueError as exc:
            raise StageError(str(exc)) from exc
    table = pd.concat([table, fusion], ignore_index=True)
    table["smape_oof"] = table["smape_oof"].round(4)
    labels = [f"{g}: {n}" for g, n in zip(table["group"], table["name"], strict=True)]
    sampled = (
        f" (fusion head variants on {len(sample):,} of {len(train):,} rows: ablation.max_rows)"
        if len(sample) < len(train)
        else ""
    )
    return StageRecord(
        summary=f"ablation (OOF SMAPE %){sampled}:\n{table.to_string(index=False)}",
        metrics={ablation_key(g, n): v for g, n, v in table.itertuples(index=False, name=None)},
        plots=[records.bars("ablation", labels, table["smape_oof"].tolist(), TITLE)],
        tables={"ablation_table.json": table},
        params={"fusion_rows": len(sample)},
    )
