"""The fetch_images stage's library core on local image files, without MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pricefuse.core.errors import StageError
from pricefuse.data.images.update import read_links, update_cache
from tests.support import project_params


def test_read_links_distinct_in_first_seen_order(tmp_path: Path) -> None:
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    pd.DataFrame({"sample_id": [1, 2, 3], "image_link": ["b.jpg", "", "a.jpg"]}).to_csv(
        train, index=False
    )
    pd.DataFrame({"sample_id": [4, 5], "image_link": ["a.jpg", "c.jpg"]}).to_csv(test, index=False)
    assert read_links([train, test]) == ["b.jpg", "a.jpg", "c.jpg"]
    pd.DataFrame({"sample_id": [4]}).to_csv(test, index=False)
    with pytest.raises(StageError, match="no 'image_link' column"):
        read_links([train, test])
    with pytest.raises(StageError, match="not found"):
        read_links([tmp_path / "absent.csv"])


def test_core_returns_the_record_without_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails from here on
    monkeypatch.chdir(tmp_path)
    for name, colour in (("a.jpg", (200, 30, 30)), ("b.jpg", (30, 30, 200))):
        Image.new("RGB", (64, 48), colour).save(tmp_path / name)
    links = ["a.jpg", "b.jpg", "gone.jpg"]
    images_dir = Path("data/images")
    cfg = project_params().fetch

    result = update_cache(links, images_dir, cfg)
    manifest = images_dir / "manifest.csv"
    assert result.artifacts == {"fetch_images": [manifest]} and manifest.is_file()
    assert result.metrics["n_links"] == 3 and result.metrics["n_missing"] == 1
    assert result.metrics["n_ok"] + result.metrics["n_cached"] == 2
    meta = result.meta[images_dir]
    assert meta["links"] == 3 and meta["counts"]["missing"] == 1 and meta["hosts_down"] == []
    assert "3 links" in result.summary

    again = update_cache(links, images_dir, cfg)  # resumes: valid files are not fetched again
    assert again.meta[images_dir]["counts"]["cached"] == 2
    assert not (images_dir / "meta.json").exists()  # tracking.record writes it
