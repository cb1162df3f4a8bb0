"""The `ensemble` stage's work: align the members' predictions, fit the blend and stackers out of
fold, keep the best, save it, and predict the test rows through the saved state.

Why here and not in the stage: the same steps are what a test (or a notebook) runs to rebuild the
ensemble without MLflow; logging the served model is the stage's part.
"""

from __future__ import annotations

import pandas as pd

from pricefuse.core import records
from pricefuse.core.config import Params
from pricefuse.core.errors import StageError
from pricefuse.core.layout import FOLD, ID, Layout
from pricefuse.core.records import StageRecord
from pricefuse.models.ensemble.blend import EnsembleState, fit_ensemble, meta_features, to_price
from pricefuse.models.ensemble.diversity import as_plot_frame, error_correlation, mean_pairwise
from pricefuse.models.ensemble.intervals import (
    PLOT_LEVELS,
    REPORT_LEVELS,
    ConformalCalibration,
    coverage_curve,
    coverage_table,
    interval_metrics,
)
from pricefuse.pipeline.inputs import load_image_mask, load_parsed, train_targets
from pricefuse.pipeline.members import UnknownMemberError, selected_members
from pricefuse.pipeline.predictions import member_predictions

NAME = "ensemble"


def build_ensemble(params: Params, layout: Layout) -> StageRecord:
    """Fit and save the ensemble of `ensemble.members`; write its OOF and test predictions."""
    cfg = params.ensemble
    try:
        members = list(selected_members(params))
    except UnknownMemberError as exc:
        raise StageError(f"ensemble.members: {exc}") from exc
    train, test = load_parsed(layout, "train"), load_parsed(layout, "test")
    train_mask = load_image_mask(layout, "train", train)
    test_mask = load_image_mask(layout, "test", test)
    y_log, folds = train_targets(train)
    oof = member_predictions(params, "train", members, train[ID]).to_numpy()
    test_members = member_predictions(params, "test", members, test[ID]).to_numpy()

    fit = fit_ensemble(
        oof,
        members,
        y_log,
        folds,
        meta_features(train, train_mask),
        cfg.stackers,
        cfg.stack_alpha,
        params.seed,
    )
    out_dir = layout.model_dir(NAME)
    fit.state.save(out_dir)
    # price_low/price_high of the served model: conformal on the OOF residuals
    # (models.ensemble.intervals)
    ConformalCalibration.fit(y_log, fit.oof, train_mask).save(out_dir)
    coverage = coverage_table(
        y_log, fit.oof, train_mask, folds, sorted({*PLOT_LEVELS, *REPORT_LEVELS})
    )
    # Test predictions through the saved state, exactly as the served model computes them.
    test_log = EnsembleState.load(out_dir).predict_log(test_members, meta_features(test, test_mask))
    pd.DataFrame({ID: train[ID], FOLD: folds, NAME: fit.oof}).to_parquet(
        layout.oof_predictions(NAME), index=False
    )
    pd.DataFrame({ID: test[ID], NAME: test_log, "price": to_price(test_log)}).to_parquet(
        layout.test_predictions(NAME), index=False
    )
    metrics = {**fit.metrics, **interval_metrics(coverage)}
    per_member = {name: oof[:, i] for i, name in enumerate(members)}
    corr = error_correlation(y_log, per_member)
    metrics["error_correlation_mean"] = mean_pairwise(corr)
    # What combining bought over the best single member (SMAPE points; > 0 is a gain).
    best_member = min(metrics[f"smape_oof_{m}"] for m in members)
    metrics["gain_over_best_member"] = best_member - metrics["smape_oof"]
    return StageRecord(
        summary=_summary(metrics, members, fit.state.method),
        metrics=metrics,
        tags={"ensemble.method": fit.state.method},
        plots=[
            records.pred_vs_actual("pred_vs_actual", y_log, fit.oof, "ensemble OOF"),
            records.decile_plot(
                "smape_by_decile",
                y_log,
                {**per_member, NAME: fit.oof},
                "OOF SMAPE by price decile",
            ),
            records.bars(
                "members",
                *_member_bars(metrics, members, cfg.stackers),
                "OOF SMAPE (%), lower is better",
            ),
            records.PlotData(
                "error_correlation",
                "heatmap",
                as_plot_frame(corr),
                "correlation of the members' OOF log errors",
            ),
            records.PlotData(
                "interval_coverage",
                "coverage",
                coverage_curve(coverage),
                "price intervals: empirical vs nominal coverage (OOF rows)",
            ),
        ],
        meta={out_dir: {"method": fit.state.method, "smape_oof": metrics["smape_oof"]}},
    )


def _member_bars(
    metrics: dict[str, float], members: list[str], stackers: tuple[str, ...]
) -> tuple[list[str], list[float]]:
    labels = [*members, "equal-weight mean", "fitted blend", *(f"stack: {k}" for k in stackers)]
    keys = [
        *(f"smape_oof_{m}" for m in members),
        "smape_oof_mean",
        "smape_oof_blend",
        *(f"smape_oof_stack_{k}" for k in stackers),
    ]
    return labels, [metrics[k] for k in keys]


def _summary(metrics: dict[str, float], members: list[str], method: str) -> str:
    lines = ["OOF SMAPE (%):"]
    for name in members:
        lines.append(f"  {name:<18} {metrics[f'smape_oof_{name}']:7.3f}")
    others = {"equal-weight mean": "smape_oof_mean", "fitted blend": "smape_oof_blend"}
    others.update(
        {
            f"stack: {k[len('smape_oof_stack_') :]}": k
            for k in metrics
            if k.startswith("smape_oof_stack_")
        }
    )
    for label, key in others.items():
        lines.append(f"  {label:<18} {metrics[key]:7.3f}")
    lines.append(f"  {'ensemble (' + method + ')':<18} {metrics['smape_oof']:7.3f}")
    lines.append(
        f"gain over the best member {metrics['gain_over_best_member']:.3f} points; mean pairwise "
        f"correlation of the members' OOF errors {metrics['error_correlation_mean']:.3f}"
    )
    lines.append(
        f"80% price interval: covers {100 * metrics['interval_coverage_cv_80']:.1f}% of OOF rows "
        f"(calibrated on the other folds; {100 * metrics['interval_coverage_80']:.1f}% in "
        f"sample), mean width {metrics['interval_width_pct_80']:.0f}% of the price"
    )
    return "\n".join(lines)
