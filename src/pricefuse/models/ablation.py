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

from pricefuse.config import FusionConfig
from pricefuse.metrics import smape
from pricefuse.models.ensemble import fit_blend_weights, leave_one_out, to_price
from pricefuse.models.train import MODALITY_GROUPS, SplitData, train_kfold

FUSION_VARIANTS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "image": ("image",),
    "tabular": ("tabular",),
    "all": MODALITY_GROUPS,
}


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
