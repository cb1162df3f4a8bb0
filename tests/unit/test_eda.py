"""pricefuse.analysis.eda on small hand-made frames, and notebooks/01_eda.ipynb on a tiny demo
set."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pricefuse.analysis import eda
from pricefuse.data.catalog import format_catalog, parse_frame
from pricefuse.data.demo import generate_demo
from tests.support import project_params

REPO_ROOT = Path(__file__).resolve().parents[2]


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _parse(texts: list[str], prices: list[float]) -> pd.DataFrame:
    """Raw catalog texts and prices -> a parsed frame like load_train's, without images."""
    raw = pd.DataFrame(
        {
            "sample_id": range(len(texts)),
            "catalog_content": texts,
            "image_link": [""] * len(texts),
            "price": prices,
        }
    )
    return parse_frame(raw)[0]


def _rows(specs: list[tuple[str, float | None, str | None, float]]) -> pd.DataFrame:
    """(item name, value, unit, price) rows in the competition's layout, parsed."""
    texts = [format_catalog(name, value=value, unit=unit) for name, value, unit, _ in specs]
    return _parse(texts, [price for *_, price in specs])


def test_price_summary_shows_the_skew_log1p_removes():
    prices = np.exp(np.random.default_rng(0).normal(2.5, 1.0, size=4000)) - 1
    summary = eda.price_summary(prices)
    assert summary.loc["skewness", "price"] > 3
    assert abs(summary.loc["skewness", "log1p(price)"]) < 0.2
    assert summary.loc["p50", "price"] == pytest.approx(np.median(prices))
    assert summary.loc["count", "price"] == 4000


def test_constant_smape_prefers_the_log_space_centre_over_the_mean():
    scores = eda.constant_smape([1.0, 2.0, 3.0, 4.0, 200.0])
    assert scores["mean"] > scores["expm1(mean log1p)"] >= scores["median"] - 1e-9
    assert scores["median"] == pytest.approx(100 * np.mean([1, 1 / 2.5, 0, 1 / 3.5, 197 / 101.5]))


def test_unit_spellings_counted_per_raw_spelling_and_per_canonical_unit():
    parsed = _rows(
        [
            ("a", 12.0, "Ounce", 3.0),
            ("b", 10.0, "Ounce", 4.0),
            ("c", 8.0, "oz", 5.0),
            ("d", 16.0, "Fl. Oz", 6.0),
            ("e", 2.0, "fluid ounce", 7.0),
            ("f", 3.0, "Tea Bags", 8.0),
        ]
    )
    spellings = eda.unit_spellings(parsed).set_index("unit_raw")
    assert spellings.loc["Ounce", "rows"] == 2 and spellings.loc["Ounce", "unit"] == "ounce"
    assert (
        spellings.loc["Fl. Oz", "unit"] == "fl_oz" and spellings.loc["Fl. Oz", "kind"] == "volume"
    )
    assert spellings.loc["Tea Bags", "unit"] == "count"
    by_unit = eda.units_by_canonical(parsed).set_index("unit")
    assert by_unit.loc["ounce", "rows"] == 3 and by_unit.loc["ounce", "spellings"] == 2
    assert by_unit.loc["fl_oz", "spellings"] == 2
    assert "'Fl. Oz'" in by_unit.loc["fl_oz", "examples"]
    assert by_unit["share"].sum() == pytest.approx(1.0)


def test_parse_failures_name_the_problem_and_keep_the_raw_text():
    texts = [
        "Item Name: fine\nValue: about twelve\nUnit: Ounce\n",
        format_catalog("no value", value=None, unit="Ounce"),
        format_catalog("nan value", value=float("nan"), unit="None"),
        format_catalog("no unit", value=2.0, unit=None),
        format_catalog("odd unit", value=2.0, unit="Furlongs"),
    ]
    parsed = _parse(texts, [3.0, 4.0, 5.0, 6.0, 7.0])
    failures = eda.parse_failures(parsed).set_index("item_name")
    assert failures.loc["fine", "problem"] == "value malformed"
    assert failures.loc["fine", "value_raw"] == "about twelve"
    assert failures.loc["no value", "problem"] == "value missing"
    assert failures.loc["no value", "value_raw"] == "<missing>"
    assert failures.loc["no unit", "unit_raw"] == "<missing>"
    assert failures.loc["nan value", "problem"] == "value missing, unit none"
    assert failures.loc["no unit", "problem"] == "unit missing"
    assert failures.loc["odd unit", "problem"] == "unit unknown"
    counts = eda.parse_failure_counts(eda.parse_failures(parsed), len(parsed)).set_index("problem")
    assert counts["rows"].to_dict() == {
        "value missing": 2,
        "value malformed": 1,
        "unit missing": 1,
        "unit none": 1,
        "unit unknown": 1,
    }


def test_duplicate_groups_find_the_same_key_at_different_prices():
    keys = ["tea", "tea", "tea", "coffee", "coffee", "salt", "", ""]
    prices = [2.0, 3.0, 6.0, 5.0, 5.0, 1.0, 9.0, 1.0]
    groups = eda.duplicate_groups(keys, prices)
    assert groups["key"].tolist() == ["tea", "coffee"]  # widest spread first; "" links nothing
    tea = groups.iloc[0]
    assert (tea["rows"], tea["distinct_prices"], tea["ratio"]) == (3, 3, 3.0)
    assert (tea["min_price"], tea["median_price"], tea["max_price"]) == (2.0, 3.0, 6.0)
    assert groups.iloc[1]["distinct_prices"] == 1
    summary = eda.duplicate_summary({"text": keys, "none": ["a", "b"] * 4}, prices)
    text = summary.set_index("key").loc["text"]
    assert (text["groups"], text["rows_in_groups"], text["groups_with_different_prices"]) == (
        2,
        5,
        1,
    )
    assert eda.duplicate_groups(["a", "b"], [1.0, 2.0]).empty


def test_duplicate_keys_and_examples_cover_text_and_image_bytes(tmp_path: Path):
    parsed = _rows(
        [
            ("Tea, 12 oz", 12.0, "Ounce", 3.0),
            ("tea 12 OZ", 12.0, "Ounce", 9.0),
            ("Coffee", 10.0, "Ounce", 5.0),
            ("Salt", 1.0, "Ounce", 1.0),
        ]
    )
    same = _jpeg((200, 10, 10))
    (tmp_path / "a.jpg").write_bytes(same)
    (tmp_path / "b.jpg").write_bytes(same)
    (tmp_path / "c.jpg").write_bytes(_jpeg((10, 10, 200)))
    files = [str(tmp_path / "c.jpg"), "", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    parsed["image_sha256"] = [eda.file_sha256(f) for f in files]
    keys = eda.duplicate_keys(parsed)
    summary = eda.duplicate_summary(keys, parsed["price"]).set_index("key")
    assert summary.loc["catalog_content", "groups"] == 0  # the raw texts differ
    assert summary.loc["item name (fold key)", "groups_with_different_prices"] == 1
    assert summary.loc["image bytes", "groups_with_different_prices"] == 1  # Coffee 5 vs Salt 1
    examples = eda.duplicate_examples(parsed, keys["item name (fold key)"])
    assert examples["price"].tolist() == [3.0, 9.0] and set(examples["group"]) == {1}
    assert examples["ratio"].iloc[0] == 3.0
    assert eda.duplicate_examples(parsed, keys["catalog_content"]).empty


def test_group_folds_never_split_a_duplicate_group_random_folds_do():
    keys = [f"product {i // 2}" for i in range(40)]  # twenty pairs
    assert eda.groups_split_across_folds(keys, [0] * 40) == 0
    assert eda.groups_split_across_folds(keys, [i % 2 for i in range(40)]) == 20
    parsed = _rows([(f"Product {i // 2}", 1.0, "Count", 1.0 + i) for i in range(40)])
    leakage = eda.fold_leakage(parsed, {"name": keys}, n_folds=5, seed=1).iloc[0]
    assert leakage["groups"] == 20
    assert leakage["split by group folds"] == 0
    assert leakage["split by random folds"] > 10


def test_images_resolved_by_path_and_by_name_then_decoded(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.jpg").write_bytes(_jpeg((1, 2, 3)))
    (images / "bad.jpg").write_bytes(_jpeg((1, 2, 3))[:40])
    links = [
        "",
        "https://cdn.example/images/I/good.jpg",
        "images/bad.jpg",
        "https://cdn.example/images/I/absent.jpg",
        "images/absent.jpg",
    ]
    files = [eda.resolve_image_file(link, tmp_path, images) for link in links]
    assert files == ["", str(images / "good.jpg"), str(images / "bad.jpg"), "", ""]
    assert eda.resolve_image_file("https://cdn.example/x/good.jpg", tmp_path, None) == ""
    statuses = eda.image_status(links, files, project_params().fetch)
    assert statuses.tolist() == ["no link", "ok", "undecodable", "not found", "not found"]
    funnel = eda.image_availability(statuses).set_index("stage")["rows"]
    assert funnel.tolist() == [5, 4, 2, 1]


def test_price_by_label_bins_pack_buckets_and_spearman():
    by = eda.price_by([True, False, True, False], [4.0, 1.0, 6.0, 3.0]).set_index("label")
    assert by.loc[True, "median"] == 5.0 and by.loc[False, "rows"] == 2
    buckets = eda.pack_bucket([1, 2, 3, 4, 5, 6, 11, 12, 100])
    assert buckets.astype(str).tolist() == [
        "1",
        "2",
        "3",
        "4-5",
        "4-5",
        "6-11",
        "6-11",
        "12+",
        "12+",
    ]
    by_pack = eda.price_by(buckets, range(9))
    assert by_pack["label"].astype(str).tolist() == ["1", "2", "3", "4-5", "6-11", "12+"]
    bins = eda.binned_price(range(10), [float(x) for x in range(10)], n_bins=5)
    assert bins["rows"].tolist() == [2] * 5 and bins["median_price"].tolist() == [
        0.5,
        2.5,
        4.5,
        6.5,
        8.5,
    ]
    assert eda.spearman([1, 2, 3, 4], [10.0, 20.0, 25.0, 100.0]) == pytest.approx(1.0)


def test_choose_source_prefers_the_env_then_real_rows_then_demo(tmp_path: Path):
    root = tmp_path / "repo"
    (root / "data/raw/demo/images").mkdir(parents=True)
    (root / "data/raw/demo/train.csv").write_text("x\n")
    mine = tmp_path / "mine.csv"
    mine.write_text("x\n")
    assert eda.choose_source(root, {eda.DATA_ENV: str(mine)}).kind == "env"
    with pytest.raises(FileNotFoundError, match="PRICEFUSE_EDA_DATA"):
        eda.choose_source(root, {eda.DATA_ENV: str(tmp_path / "absent.csv")})
    demo = eda.choose_source(root, {})
    assert demo.kind == "demo" and demo.images_dir == root / "data/raw/demo/images"
    real = tmp_path / "shared/data/amazon2025"
    real.mkdir(parents=True)
    (real / "train.csv").write_text("x\n")
    chosen = eda.choose_source(root, {})
    assert chosen.kind == "real" and "REAL" in chosen.describe()
    assert eda.find_root(root / "data/raw") == (root / "data/raw").resolve()  # no params.yaml
    assert eda.find_root(REPO_ROOT / "notebooks") == REPO_ROOT


def test_choose_source_generates_a_demo_when_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the generated rows land here
    source = eda.choose_source(tmp_path, {eda.DEMO_ROWS_ENV: "30"})
    assert source.kind == "generated demo" and source.images_dir is not None
    train = eda.load_train(source)
    assert len(train) == 30 and train["has_image"].any()
    assert {"log_price", "image_file", "image_status", "image_sha256"} <= set(train.columns)


def test_load_train_reads_a_demo_with_every_image_fate(tmp_path: Path):
    cfg = replace(project_params().demo, n_train=80, n_test=1, image_size=32, broken_link_rate=0.05)
    generate_demo(cfg, seed=5, out_dir=tmp_path / "demo")
    train = eda.load_train(eda.choose_source(tmp_path, {eda.DATA_ENV: str(tmp_path / "demo")}))
    assert set(train["image_status"]) == set(eda.IMAGE_STATUSES)
    ok = train["image_status"] == "ok"
    assert (train.loc[ok, "image_sha256"].str.len() == 64).all()
    assert (train.loc[train["image_status"] == "no link", "image_sha256"] == "").all()


def test_eda_notebook_executes_on_a_tiny_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import nbformat
    from nbclient import NotebookClient

    cfg = replace(project_params().demo, n_train=120, n_test=1, image_size=32)
    generate_demo(cfg, seed=7, out_dir=tmp_path / "demo")
    monkeypatch.setenv(eda.DATA_ENV, str(tmp_path / "demo"))
    path = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)  # the kernel imports this checkout's pricefuse
    notebook = nbformat.read(REPO_ROOT / "notebooks/01_eda.ipynb", 4)
    assert all(not cell.get("outputs") for cell in notebook.cells)  # committed without outputs
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
    ).execute()
    outputs = eda_outputs(notebook)
    for expected in (
        "rows named by $PRICEFUSE_EDA_DATA",
        "120 train rows",
        "log1p(price) skewness",
        "Unit spellings per canonical unit",
        "Duplicate groups and their price spread",
        "split by group folds",
        "Image availability",
        "Spearman with price",
    ):
        assert expected in outputs, expected


def eda_outputs(notebook) -> str:
    """Text of every code cell's outputs (streams and plain-text results)."""
    return "".join(
        str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
