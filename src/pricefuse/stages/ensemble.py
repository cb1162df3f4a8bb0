"""Stage `ensemble`: combine the members named in `ensemble.members` (blend or stacker, whichever
scores better out of fold), then log the full inference path as a pyfunc model and register it."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from pricefuse import plots, tracking
from pricefuse.config import Params
from pricefuse.errors import StageError
from pricefuse.layout import FOLD, ID, LOG_PRICE, PLOTS_DIR, Layout
from pricefuse.members import UnknownMemberError, selected_members, serving_producers
from pricefuse.models.ensemble import EnsembleState, fit_ensemble, meta_features, to_price
from pricefuse.predictions import member_predictions
from pricefuse.serving import log_price_model

STAGE = "ensemble"


def _split(layout: Layout, split: str) -> tuple[pd.DataFrame, np.ndarray]:
    path = layout.parsed(split)
    if not path.exists():
        raise StageError(f"{path} not found: run preprocess first")
    parsed = pd.read_parquet(path)
    mask_path = layout.image_mask(split)
    if not mask_path.exists():
        raise StageError(f"{mask_path} not found: run embed first")
    mask = np.load(mask_path).astype(bool)
    if len(mask) != len(parsed):
        raise StageError(f"{split}: {len(parsed)} parsed rows but {len(mask)} image-mask rows")
    return parsed, mask


def run(params: Params) -> None:
    cfg = params.ensemble
    layout = Layout(params.data)
    try:
        members = list(selected_members(params))
    except UnknownMemberError as exc:
        raise StageError(f"ensemble.members: {exc}") from exc
    train, train_mask = _split(layout, "train")
    test, test_mask = _split(layout, "test")
    oof = member_predictions(params, "train", members, train[ID]).to_numpy()
    test_members = member_predictions(params, "test", members, test[ID]).to_numpy()
    y_log = train[LOG_PRICE].to_numpy(dtype=np.float64)
    folds = train[FOLD].to_numpy()

    upstream = [layout.interim_dir, layout.features_dir]
    upstream += [layout.model_dir(p.name) for p in serving_producers(params)]
    out_dir = layout.model_dir("ensemble")
    with tracking.stage_run(STAGE, params, inputs=upstream) as run:
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
        fit.state.save(out_dir)
        # Test predictions through the saved state, exactly as the served model computes them.
        saved = EnsembleState.load(out_dir)
        test_log = saved.predict_log(test_members, meta_features(test, test_mask))
        pd.DataFrame({ID: train[ID], FOLD: folds, "ensemble": fit.oof}).to_parquet(
            layout.oof_predictions("ensemble"), index=False
        )
        pd.DataFrame({ID: test[ID], "ensemble": test_log, "price": to_price(test_log)}).to_parquet(
            layout.test_predictions("ensemble"), index=False
        )
        metrics = fit.metrics
        tracking.log_metrics(metrics)
        mlflow.set_tag("ensemble.method", fit.state.method)
        print(_summary(metrics, members, fit.state.method))
        _log_plots(np.expm1(y_log), fit.oof, metrics, members, cfg.stackers)
        info = log_price_model(params, layout, test_rows=_input_example(params))
        tracking.write_meta(
            out_dir,
            STAGE,
            run.info.run_id,
            method=fit.state.method,
            model_uri=info["model_uri"],
            registered_model=info.get("registered_model"),
            registered_version=info.get("registered_version"),
            smape_oof=metrics["smape_oof"],
        )


def _log_plots(
    y: np.ndarray,
    oof_log: np.ndarray,
    metrics: dict[str, float],
    members: list[str],
    stackers: tuple[str, ...],
) -> None:
    scatter = plots.pred_vs_actual(
        y, to_price(oof_log), "ensemble OOF", PLOTS_DIR / "ensemble_pred_vs_actual.png"
    )
    labels = [*members, "equal-weight mean", "fitted blend", *(f"stack: {k}" for k in stackers)]
    keys = [
        *(f"smape_oof_{m}" for m in members),
        "smape_oof_mean",
        "smape_oof_blend",
        *(f"smape_oof_stack_{k}" for k in stackers),
    ]
    bars = plots.bar_chart(
        labels,
        [metrics[k] for k in keys],
        "OOF SMAPE (%), lower is better",
        PLOTS_DIR / "ensemble_members.png",
    )
    for path in (scatter, bars):
        mlflow.log_artifact(str(path), "plots")


def _input_example(params: Params) -> pd.DataFrame:
    raw = pd.read_csv(params.data.test_csv, nrows=3)
    columns = [c for c in ("catalog_content", "image_link") if c in raw.columns]
    return raw[columns]


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
    return "\n".join(lines)
