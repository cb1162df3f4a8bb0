"""Stage `ablation`: each member alone, the blend without each member, and the fusion head on
each modality subset; a table and a bar plot in MLflow, `metrics/ablation.json` (the run's
metrics, `<group>/<name>`), and what `pricefuse evaluate` prints."""

from __future__ import annotations

import mlflow
import pandas as pd
from tqdm import tqdm

from pricefuse import plots, tracking
from pricefuse.config import Params
from pricefuse.errors import StageError
from pricefuse.layout import ID, PLOTS_DIR, Layout
from pricefuse.members import UnknownMemberError, selected_members
from pricefuse.models.ablation import FUSION_VARIANTS, fusion_modality_table, member_table
from pricefuse.predictions import member_predictions
from pricefuse.reports import ablation_key
from pricefuse.stages.train_fusion import load_split

STAGE = "ablation"


def run(params: Params) -> None:
    layout = Layout(params.data)
    try:
        members = list(selected_members(params))
    except UnknownMemberError as exc:
        raise StageError(f"ensemble.members: {exc}") from exc
    train = load_split(params, "train")
    y_log = train.target
    oof = member_predictions(params, "train", members, train.frame[ID]).to_numpy()
    upstream = [layout.interim_dir, layout.features_dir, layout.model_dir("ensemble")]
    with tracking.stage_run(STAGE, params, inputs=upstream) as run:
        table = member_table(oof, members, y_log)
        variants = params.ablation.fusion_variants
        unknown = sorted(set(variants) - set(FUSION_VARIANTS))
        if unknown:
            raise StageError(
                f"ablation.fusion_variants: unknown {unknown}; known: {', '.join(FUSION_VARIANTS)}"
            )
        with tqdm(total=len(variants), desc="fusion variants", disable=None) as bar:
            try:
                fusion = fusion_modality_table(
                    train, params.fusion, params.seed, variants, lambda label: bar.update()
                )
            except ValueError as exc:
                raise StageError(str(exc)) from exc
        table = pd.concat([table, fusion], ignore_index=True)
        table["smape_oof"] = table["smape_oof"].round(4)
        # Logged as `<group>/<name>` metrics: the stage's metrics file (metrics/ablation.json,
        # which DVC shows and diffs) mirrors them, and `pricefuse evaluate` reads the table back.
        tracking.log_metrics(
            {ablation_key(g, n): v for g, n, v in table.itertuples(index=False, name=None)}
        )
        mlflow.log_table(table, "ablation_table.json")
        labels = [f"{g}: {n}" for g, n in zip(table["group"], table["name"], strict=True)]
        bars = plots.bar_chart(
            labels,
            table["smape_oof"].tolist(),
            "Ablation: OOF SMAPE (%), lower is better",
            PLOTS_DIR / "ablation.png",
        )
        mlflow.log_artifact(str(bars), "plots")
        print(f"ablation (run {run.info.run_id}):\n{table.to_string(index=False)}")
