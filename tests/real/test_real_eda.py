"""notebooks/01_eda.ipynb on the real rows in ../shared/data/amazon2025 (skipped when absent).

The notebook runs in memory and is never saved: outputs computed on real rows stay out of git.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.real

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_eda_notebook_on_the_real_rows(shared_data: Path, monkeypatch: pytest.MonkeyPatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PRICEFUSE_EDA_DATA", str(shared_data))
    path = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    notebook = nbformat.read(REPO_ROOT / "notebooks/01_eda.ipynb", 4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
    ).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(
        str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", "")) for out in outputs
    )
    print("\n" + text)

    rows = len(pd.read_csv(shared_data / "train.csv"))
    assert f"{rows} train rows" in text
    skew = re.search(r"price skewness ([-\d.]+), log1p\(price\) skewness ([-\d.]+)", text)
    assert skew is not None
    assert float(skew.group(1)) > 2 and abs(float(skew.group(2))) < 1  # log1p removes the skew
    for expected in (
        "Unit spellings per canonical unit",
        "Duplicate groups and their price spread",
        "split by group folds",
        "link resolves to a local file",
        "Spearman with price",
    ):
        assert expected in text, expected
    figures = sum("image/png" in out.get("data", {}) for out in outputs)
    assert figures >= 3
