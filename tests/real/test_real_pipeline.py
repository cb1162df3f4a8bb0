"""The pipeline on the real competition rows in ../shared/data/amazon2025 (skipped when absent).

The rows are read in place; the temp project gets CSVs whose image links point at the shared
product images where one exists (the machine is offline, so the other links exercise the
unreachable-host path). Nothing derived from the data leaves the temp dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pricefuse.core.metrics import smape
from tests.support import run_cmd

N_TEST_ROWS = 300
# Issue "more signal from the same rows": the ensemble's OOF SMAPE on these rows was 56.8 before
# the n-gram and neighbour members, leak-free features and stacking; it must beat that by 2.
ENSEMBLE_TARGET = 54.8


def _localise_links(frame: pd.DataFrame, images: Path) -> pd.DataFrame:
    """Point image links at the shared copies of the images (by last path segment)."""
    available = {p.name for p in images.glob("*.jpg")}
    out = frame.copy()
    names = out["image_link"].fillna("").str.rsplit("/", n=1).str[-1]
    local = names.isin(available)
    out.loc[local, "image_link"] = [str(images / n) for n in names[local]]
    return out


def write_real_rows(root: Path, shared_data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The real train rows and the first N_TEST_ROWS test rows as `root/real/{train,test}.csv`
    (where the test points data.train_csv and data.test_csv), image links at the shared copies."""
    (root / "real").mkdir()
    images = shared_data / "images"
    train = _localise_links(pd.read_csv(shared_data / "train.csv"), images)
    test = _localise_links(pd.read_csv(shared_data / "test.csv").head(N_TEST_ROWS), images)
    train.to_csv(root / "real/train.csv", index=False)
    test.to_csv(root / "real/test.csv", index=False)
    return train, test


def test_real_data_members_and_ensemble(shared_data: Path, make_project):
    root = make_project(
        "real",
        {
            "data": {"train_csv": "real/train.csv", "test_csv": "real/test.csv"},
            "fetch": {"connect_timeout": 2.0, "read_timeout": 5.0, "retries": 1},
        },
    )
    train, test = write_real_rows(root, shared_data)

    run_cmd(["dvc", "repro"], root, timeout=3000)
    report = run_cmd(["pricefuse", "evaluate"], root).stdout
    print("\nreal-data OOF SMAPE (pricefuse evaluate):\n" + report)

    prices = train["price"].to_numpy()
    constant = smape(prices, np.full_like(prices, np.median(prices)))
    ensemble = json.loads((root / "metrics/ensemble.json").read_text())
    members = {k[len("smape_oof_") :]: v for k, v in ensemble.items() if k.startswith("smape_oof_")}
    print("\nOOF SMAPE (%) per member and combination, from metrics/ensemble.json:")
    for name, score in members.items():
        print(f"  {name:<22} {score:7.3f}")
    print(f"constant median: {constant:.2f}%   ensemble OOF: {ensemble['smape_oof']:.2f}%")
    assert ensemble["smape_oof"] < constant - 10.0, (ensemble["smape_oof"], constant)
    assert ensemble["smape_oof"] <= ENSEMBLE_TARGET, ensemble["smape_oof"]
    for member in ("fusion", "lightgbm", "xgboost", "catboost", "linear", "knn"):
        assert members[member] > ensemble["smape_oof"], member
    submission = pd.read_csv(root / "data/submissions/submission.csv")
    assert sorted(submission["sample_id"]) == sorted(test["sample_id"])
