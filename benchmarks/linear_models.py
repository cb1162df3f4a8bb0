"""The n-gram member's choices on the project's folds: text view, Ridge strength, and other
linear models on the same TF-IDF features (LinearSVR ~ absolute error, SGD with Huber loss).

Run after `dvc repro` has written the parsed tables (e.g. on the real rows):

    python benchmarks/linear_models.py [--project DIR] [--results]

Prints OOF SMAPE (%) and seconds per variant. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.core.config import load_params
from pricefuse.core.layout import Layout
from pricefuse.core.metrics import smape_from_log
from pricefuse.models.linear.predictor import LinearPredictor
from pricefuse.models.linear.training import fit_linear
from pricefuse.pipeline.inputs import train_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import add_results_option, table, write_results


def other_model_oof(
    cfg, parsed: pd.DataFrame, y: np.ndarray, folds: np.ndarray, make: Callable[[], object]
) -> np.ndarray:
    """OOF predictions of another sklearn regressor on the member's own TF-IDF features."""
    oof = np.zeros(len(y))
    for k in np.unique(folds):
        held = folds == k
        features = LinearPredictor.fit(cfg, parsed[~held], y[~held])
        centre = y[~held].mean()
        model = make().fit(features.transform(parsed[~held]), y[~held] - centre)
        oof[held] = model.predict(features.transform(parsed[held])) + centre
    return oof


def main() -> None:
    from sklearn.linear_model import SGDRegressor
    from sklearn.svm import LinearSVR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="project root")
    add_results_option(parser, "linear_models")
    args = parser.parse_args()
    os.chdir(args.project)
    params = load_params("params.yaml")
    parsed = pd.read_parquet(Layout(params.data).parsed("train"))
    y, folds = train_targets(parsed)
    base = params.linear
    print(f"{len(y)} rows, {len(np.unique(folds))} folds; default: {base}")
    ridge_variants = {
        f"ridge view={base.view} alpha={base.alpha:g} (default)": base,
        "ridge alpha=1": dataclasses.replace(base, alpha=1.0),
        "ridge alpha=10": dataclasses.replace(base, alpha=10.0),
        "ridge view=text": dataclasses.replace(base, view="text"),
        "ridge word 1-3": dataclasses.replace(base, word_max_ngram=3),
    }
    rows = []
    for label, cfg in ridge_variants.items():
        started = time.perf_counter()
        score = fit_linear(cfg, parsed, y, folds).smape_oof
        rows.append([label, score, time.perf_counter() - started])
        print(f"{label:<44} {score:7.3f}  {rows[-1][2]:6.1f}s", flush=True)
    others = {
        "LinearSVR C=0.1 (absolute error)": lambda: LinearSVR(epsilon=0.0, C=0.1, max_iter=5000),
        "SGD huber eps=0.3": lambda: SGDRegressor(
            loss="huber", epsilon=0.3, alpha=1e-5, max_iter=50, random_state=0
        ),
    }
    for label, make in others.items():
        started = time.perf_counter()
        score = smape_from_log(y, other_model_oof(base, parsed, y, folds, make))
        rows.append([label, score, time.perf_counter() - started])
        print(f"{label:<44} {score:7.3f}  {rows[-1][2]:6.1f}s", flush=True)
    if args.results:
        title = (
            f"The linear member's variants: OOF SMAPE (%) on {len(y):,} train rows, "
            f"{len(np.unique(folds))} folds"
        )
        columns = ["variant", "OOF SMAPE (%)", "seconds"]
        write_results(args.results, [table(title, columns, rows, formats=[None, ".2f", ".0f"])])


if __name__ == "__main__":
    main()
