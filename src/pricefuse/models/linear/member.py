"""The n-gram member: TF-IDF word and character n-grams -> Ridge on log1p(price).

Why: on small data a linear model over sparse n-grams is strong and cheap, and its errors differ
from the embedding models' (it sees exact tokens: brand names, sizes, "Pack of 12"). Character
n-grams (char_wb) catch spelling variants and sizes glued to units ("12oz").

Fold discipline: inside each fold the vectorizers and the Ridge are fitted on the other folds only,
so an OOF prediction never saw its fold. Test and serving use one full fit on every train row.
Saved without pickle: vocabularies as JSON, IDF vectors and coefficients as .npy.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd

from pricefuse.core import records
from pricefuse.core.config import LinearConfig
from pricefuse.core.errors import StageError
from pricefuse.core.layout import ID, Layout
from pricefuse.core.records import StageRecord
from pricefuse.features.ngrams import VIEWS
from pricefuse.models.linear.predictor import MEMBER, LinearPredictor
from pricefuse.models.linear.training import fit_linear
from pricefuse.pipeline.inputs import train_targets
from pricefuse.pipeline.predictions import write_member_predictions


def train_linear_member(
    cfg: LinearConfig, train: pd.DataFrame, test: pd.DataFrame, layout: Layout
) -> StageRecord:
    """The `train_linear` stage's work: K-fold OOF fit, the full fit saved to its model directory,
    OOF and test predictions written (test through the reloaded predictor, as serving computes
    them); returns what the stage records."""
    from tqdm import tqdm

    if cfg.view not in VIEWS:
        raise StageError(f"linear.view must be one of {', '.join(VIEWS)}, got {cfg.view!r}")
    y, folds = train_targets(train)
    out_dir = layout.model_dir(MEMBER)
    # Rows fitted (each fold's held rows, then every row for the full fit), so the bar reads rows/s
    # and its ETA counts the full fit too.
    last = int(np.max(folds, initial=-1))
    with tqdm(total=2 * len(y), desc="linear", unit="row", disable=None) as bar:

        def advance(k: int) -> None:
            bar.set_postfix_str("full fit" if k == last else f"fold {k + 1}", refresh=False)
            bar.update(int(np.sum(folds == k)))

        bar.set_postfix_str("fold 0")
        fit = fit_linear(cfg, train, y, folds, on_fold_done=advance)
        bar.update(len(y))
    shutil.rmtree(out_dir, ignore_errors=True)
    fit.predictor.save(out_dir)
    saved = LinearPredictor.load(out_dir)
    write_member_predictions(
        layout, MEMBER, train[ID], folds, {MEMBER: fit.oof}, test[ID], {MEMBER: saved.predict(test)}
    )
    metrics = {"smape_oof": fit.smape_oof, "n_features": float(len(saved.coef))}
    metrics.update({f"smape_fold_{k}": s for k, s in fit.fold_smape.items()})
    return StageRecord(
        summary=f"linear OOF SMAPE {fit.smape_oof:.3f}% ({len(saved.coef)} n-gram features)",
        metrics=metrics,
        plots=records.member_plots(MEMBER, y, fit.oof),
        artifacts={"linear_model": [out_dir]},
        meta={out_dir: {"smape_oof": fit.smape_oof}},
    )
