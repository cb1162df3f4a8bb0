"""Stage `ensemble`: fit log-space blend weights and the KNN correction on OOF predictions,
then log the full inference path as a pyfunc model and register it."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from pricefuse import plots, tracking
from pricefuse.config import Params
from pricefuse.errors import StageError
from pricefuse.layout import FOLD, ID, LOG_PRICE, PLOTS_DIR, Layout
from pricefuse.metrics import smape
from pricefuse.models.ensemble import (
    EnsembleState,
    blend,
    fit_blend_weights,
    fit_knn_alpha,
    knn_mean,
    to_price,
)
from pricefuse.predictions import member_predictions
from pricefuse.serving import log_price_model

STAGE = "ensemble"


def run(params: Params) -> None:
    cfg = params.ensemble
    layout = Layout(params.data)
    members = list(cfg.members)
    if len(cfg.hand_weights) != len(members):
        raise StageError(
            f"ensemble.hand_weights has {len(cfg.hand_weights)} values for {len(members)} members"
        )
    train = pd.read_parquet(layout.parsed("train"), columns=[ID, FOLD, LOG_PRICE])
    test = pd.read_parquet(layout.parsed("test"), columns=[ID])
    oof = member_predictions(layout, "train", members, train[ID]).to_numpy()
    test_members = member_predictions(layout, "test", members, test[ID]).to_numpy()
    y_log = train[LOG_PRICE].to_numpy()
    y = np.expm1(y_log)
    folds = train[FOLD].to_numpy()

    upstream = [layout.interim_dir, layout.features_dir]
    upstream += [layout.model_dir("fusion"), layout.model_dir("gbdt")]
    data_files = [params.data.train_csv, params.data.test_csv]
    out_dir = layout.model_dir("ensemble")
    with tracking.stage_run(STAGE, params, upstream=upstream, data_files=data_files) as run:
        metrics: dict[str, float] = {}
        for i, name in enumerate(members):
            metrics[f"smape_oof_{name}"] = smape(y, to_price(oof[:, i]))
        hand = np.asarray(cfg.hand_weights) / np.sum(cfg.hand_weights)
        metrics["smape_oof_hand_blend"] = smape(y, to_price(blend(oof, hand)))
        weights = fit_blend_weights(oof, y_log, members, starts=[hand])
        blended_oof = weights.apply(oof)
        metrics["smape_oof_blend"] = smape(y, to_price(blended_oof))
        for name, w in zip(members, weights.weights, strict=True):
            metrics[f"weight_{name}"] = w
        metrics["blend_shift"] = weights.shift

        knn = None
        train_text = np.load(layout.text_embeddings("train"))
        final_oof = blended_oof
        if cfg.knn_enabled and len(train) > cfg.knn_k:
            neighbours = knn_mean(train_text, train_text, y_log, cfg.knn_k, folds, folds)
            knn = fit_knn_alpha(blended_oof, neighbours, y_log, cfg.knn_k)
            final_oof = knn.apply(blended_oof, neighbours)
            metrics["knn_alpha"] = knn.alpha
        metrics["smape_oof"] = smape(y, to_price(final_oof))
        for k in sorted(set(folds.tolist())):
            sel = folds == k
            metrics[f"smape_fold_{k}"] = smape(y[sel], to_price(final_oof[sel]))

        state = EnsembleState(weights, knn)
        state.save(out_dir, train_text if knn else None, y_log if knn else None)
        # Test predictions through the saved state, exactly as the served model computes them.
        saved, keys, values = EnsembleState.load(out_dir)
        test_text = np.load(layout.text_embeddings("test"))
        test_log = saved.predict_log(test_members, test_text, keys, values)
        pd.DataFrame({ID: train[ID], FOLD: folds, "ensemble": final_oof}).to_parquet(
            layout.oof_predictions("ensemble"), index=False
        )
        pd.DataFrame({ID: test[ID], "ensemble": test_log, "price": to_price(test_log)}).to_parquet(
            layout.test_predictions("ensemble"), index=False
        )
        tracking.log_metrics(metrics)
        print(_summary(metrics, members))

        mlflow.log_artifact(
            str(
                plots.pred_vs_actual(
                    y,
                    to_price(final_oof),
                    "ensemble OOF",
                    PLOTS_DIR / "ensemble_pred_vs_actual.png",
                )
            ),
            "plots",
        )
        member_scores = [metrics[f"smape_oof_{m}"] for m in members]
        labels = [*members, "hand blend", "fitted blend", "ensemble"]
        scores = [
            *member_scores,
            metrics["smape_oof_hand_blend"],
            metrics["smape_oof_blend"],
            metrics["smape_oof"],
        ]
        mlflow.log_artifact(
            str(
                plots.bar_chart(
                    labels,
                    scores,
                    "OOF SMAPE (%), lower is better",
                    PLOTS_DIR / "ensemble_members.png",
                )
            ),
            "plots",
        )
        info = log_price_model(params, layout, test_rows=_input_example(params))
        tracking.write_meta(
            out_dir,
            STAGE,
            run.info.run_id,
            model_uri=info["model_uri"],
            registered_model=info.get("registered_model"),
            registered_version=info.get("registered_version"),
            smape_oof=metrics["smape_oof"],
        )


def _input_example(params: Params) -> pd.DataFrame:
    raw = pd.read_csv(params.data.test_csv, nrows=3)
    columns = [c for c in ("catalog_content", "image_link") if c in raw.columns]
    return raw[columns]


def _summary(metrics: dict[str, float], members: list[str]) -> str:
    lines = ["OOF SMAPE (%):"]
    for name in members:
        lines.append(f"  {name:<14} {metrics[f'smape_oof_{name}']:7.3f}")
    lines.append(f"  {'hand blend':<14} {metrics['smape_oof_hand_blend']:7.3f}")
    lines.append(f"  {'fitted blend':<14} {metrics['smape_oof_blend']:7.3f}")
    lines.append(f"  {'ensemble+knn':<14} {metrics['smape_oof']:7.3f}")
    return "\n".join(lines)
