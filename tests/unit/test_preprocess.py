import csv
import json
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pricefuse.core.errors import StageError
from pricefuse.core.layout import MANIFEST_COLUMNS, Layout
from pricefuse.data.catalog import PARSED_COLUMNS, parse_frame
from pricefuse.data.demo import generate_demo
from pricefuse.data.preprocess import (
    DROP_REASONS,
    check_options,
    clean_prices,
    preprocess,
    price_outliers,
)
from pricefuse.data.raw import read_raw, read_raw_splits
from pricefuse.data.text_clean import TEXT_OPTIONS_OFF, parse_products
from pricefuse.stages import preprocess as stage
from tests.support import project_params

DEMO = {"n_train": 120, "n_test": 30, "image_size": 40, "missing_image_rate": 0.1}
BAD_PRICES = {0: "", 1: "abc", 2: "inf", 3: "0.001", 4: "nan"}


def _params(**sections):
    return project_params(**{"demo": DEMO, "preprocess": {"n_folds": 3}, **sections})


def _write_manifest(layout: Layout, links: list[str]) -> dict[str, str]:
    """A manifest as fetch_images writes it: the first links ok, one stale, one bad."""
    usable = [link for link in links if link and Path(link).is_file()]
    ok, stale, bad = usable[:40], usable[40], usable[41]
    layout.images_dir.mkdir(parents=True, exist_ok=True)
    with layout.manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for link in ok:
            writer.writerow([link, link, "ok", 100, 1, ""])
        writer.writerow([stale, "data/images/files/gone.jpg", "cached", 100, 1, ""])
        writer.writerow([bad, "", "bad", 10, 1, "not an image"])
    return {link: link for link in ok}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with demo CSVs; a few train prices broken on purpose."""
    monkeypatch.chdir(tmp_path)
    params = _params()
    generate_demo(params.demo, seed=params.seed)
    train_csv = Path(params.data.train_csv)
    train = pd.read_csv(train_csv, dtype={"price": str}, keep_default_na=False)
    for row, value in BAD_PRICES.items():
        train.loc[row, "price"] = value
    train.to_csv(train_csv, index=False)
    return tmp_path


def test_preprocess_writes_parsed_tables_and_logs(project: Path) -> None:
    params = _params()
    layout = Layout(params.data)
    raw_train = pd.read_csv(params.data.train_csv, keep_default_na=False)
    cached = _write_manifest(layout, raw_train["image_link"].tolist())

    stage.run(params)

    train = pd.read_parquet(layout.parsed("train"))
    test = pd.read_parquet(layout.parsed("test"))
    contract = {*PARSED_COLUMNS, "sample_id", "image_link", "image_path", "has_image", "fold"}
    assert contract <= set(test.columns)
    assert contract | {"price", "log_price"} <= set(train.columns)
    assert len(train) == DEMO["n_train"] - len(BAD_PRICES)
    assert len(test) == DEMO["n_test"]
    kept_ids = raw_train["sample_id"].drop(index=list(BAD_PRICES)).tolist()
    assert train["sample_id"].tolist() == kept_ids  # raw order minus dropped rows
    assert np.allclose(train["log_price"], np.log1p(train["price"]))
    assert set(train["fold"]) == {0, 1, 2}
    assert (test["fold"] == -1).all()
    assert train.groupby("item_name")["fold"].nunique().max() == 1
    expected_paths = train["image_link"].map(lambda link: cached.get(link, ""))
    assert train["image_path"].tolist() == expected_paths.tolist()
    assert train["has_image"].tolist() == (expected_paths != "").tolist()
    assert train["has_image"].any() and not train["has_image"].all()
    assert isinstance(train["bullets"].iloc[0], list | np.ndarray)

    meta = json.loads((layout.interim_dir / "meta.json").read_text())
    assert meta["stage"] == "preprocess" and meta["image_manifest"] is True
    run = mlflow.get_run(meta["run_id"])
    metrics = run.data.metrics
    assert metrics["dropped_price_missing"] == 2  # "" and "nan"
    assert metrics["dropped_price_not_numeric"] == 1
    assert metrics["dropped_price_not_finite"] == 1
    assert metrics["dropped_price_below_min"] == 1
    assert metrics["dropped_total"] == 5
    assert metrics["rows_in_train"] == DEMO["n_train"]
    assert metrics["rows_out_train"] == len(train)
    assert metrics["unit_coverage_train"] == 1.0
    assert metrics["images_train_manifest_files_absent"] == 1
    assert "train_parse_value_missing" in metrics
    assert run.data.tags["stage"] == "preprocess"
    assert run.data.tags["image_manifest"] == str(layout.manifest)
    table = mlflow.load_table("preprocess/unit_distribution.json", run_ids=[run.info.run_id])
    assert list(table.columns[:5]) == ["unit_raw", "unit", "rows", "share", "split"]
    assert set(table["split"]) == {"train", "test"}
    assert (Path("plots/preprocess/price_histogram.csv")).is_file()


def test_without_manifest_no_row_has_an_image(project: Path, capsys) -> None:
    params = _params()
    stage.run(params)
    assert "no image manifest" in capsys.readouterr().out
    train = pd.read_parquet(Layout(params.data).parsed("train"))
    assert not train["has_image"].any()
    assert (train["image_path"] == "").all()


def test_missing_csv_is_a_stage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=r"train CSV .* not found"):
        stage.run(_params())


def test_missing_columns_and_duplicate_ids_are_stage_errors(project: Path) -> None:
    params = _params()
    test = pd.read_csv(params.data.test_csv, keep_default_na=False)
    test.drop(columns=["catalog_content"]).to_csv(params.data.test_csv, index=False)
    with pytest.raises(StageError, match=r"lacks column.*catalog_content"):
        stage.run(params)
    test.assign(sample_id=test["sample_id"].iloc[0]).to_csv(params.data.test_csv, index=False)
    with pytest.raises(StageError, match="repeats sample_id"):
        stage.run(params)


@pytest.mark.parametrize("n_folds", [1, 500])
def test_fold_count_is_checked_before_any_work(project: Path, n_folds: int) -> None:
    with pytest.raises(StageError, match=r"preprocess\.n_folds"):
        stage.run(_params(preprocess={"n_folds": n_folds}))


@pytest.fixture
def no_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import mlflow` fails: what runs under this fixture provably never touches tracking."""
    monkeypatch.setitem(sys.modules, "mlflow", None)


def test_core_returns_the_record_without_mlflow(project: Path, no_mlflow: None) -> None:
    params = _params()
    layout = Layout(params.data)
    raw = read_raw_splits(params.data)
    result = preprocess(raw["train"], raw["test"], params.preprocess, params.seed, layout)

    n_out = DEMO["n_train"] - len(BAD_PRICES)
    assert result.metrics["dropped_total"] == len(BAD_PRICES)
    assert {f"dropped_{reason}" for reason in DROP_REASONS} <= set(result.metrics)
    assert result.metrics["rows_in_train"] == DEMO["n_train"]
    assert result.metrics["rows_out_train"] == n_out
    assert result.metrics["rows_out_test"] == DEMO["n_test"]
    assert result.metrics["images_train_with_image"] == 0
    assert sum(result.metrics[f"fold_rows_{k}"] for k in range(3)) == n_out
    assert result.metrics["n_groups"] <= n_out
    assert result.tags == {"image_manifest": "none"}
    assert result.meta == {
        layout.interim_dir: {
            "rows": {"train": n_out, "test": DEMO["n_test"]},
            "dropped": {
                "price_missing": 2,
                "price_not_numeric": 1,
                "price_not_finite": 1,
                "price_below_min": 1,
                "price_outlier": 0,
            },
            "n_folds": 3,
            "image_manifest": False,
        }
    }
    units = result.tables["preprocess/unit_distribution.json"]
    assert units.groupby("split")["rows"].sum().to_dict() == {"train": n_out, "test": 30}
    (histogram,) = result.plots
    assert histogram.name == "price_histogram"
    assert list(histogram.frame.columns) == ["label", "value"]
    assert histogram.frame["value"].sum() == n_out
    assert "no image manifest" in result.summary
    assert len(pd.read_parquet(layout.parsed("train"))) == n_out
    assert not (layout.interim_dir / "meta.json").exists()  # tracking.record writes it


def test_clean_prices_counts_each_row_under_its_first_reason() -> None:
    frame = pd.DataFrame({"price": ["", "abc", "inf", "0.001", "nan", "2.5", None, "-inf"]})
    kept, drops = clean_prices(frame, min_price=0.01)
    assert kept["price"].tolist() == [2.5]
    assert kept["log_price"].tolist() == [pytest.approx(np.log1p(2.5))]
    assert drops == {
        "price_missing": 3,
        "price_not_numeric": 1,
        "price_not_finite": 2,
        "price_below_min": 1,
    }


def test_read_raw_fills_missing_image_links(tmp_path: Path) -> None:
    path = tmp_path / "test.csv"
    pd.DataFrame({"sample_id": [1, 2], "catalog_content": ["a", "b"]}).to_csv(path, index=False)
    assert read_raw(path, "test")["image_link"].tolist() == ["", ""]
    path.write_text('sample_id,catalog_content\n1,"unclosed\n')
    with pytest.raises(StageError, match="not a readable CSV"):
        read_raw(path, "test")


def _run_core(**options) -> tuple[dict[str, float], pd.DataFrame, pd.DataFrame]:
    """preprocess with `options` over n_folds=3: (metrics, train table, test table)."""
    params = _params(preprocess={"n_folds": 3, **options})
    layout = Layout(params.data)
    raw = read_raw_splits(params.data)
    result = preprocess(raw["train"], raw["test"], params.preprocess, params.seed, layout)
    return (
        result.metrics,
        pd.read_parquet(layout.parsed("train")),
        pd.read_parquet(layout.parsed("test")),
    )


def test_price_outliers_are_strictly_outside_the_quantiles() -> None:
    prices = np.arange(1.0, 101.0)  # quantiles 0.05 / 0.95: 5.95 and 95.05
    assert np.flatnonzero(price_outliers(prices, 0.05)).tolist() == [0, 1, 2, 3, 4, *range(95, 100)]
    assert not price_outliers(prices, 0.0).any()
    assert not price_outliers(np.full(50, 3.0), 0.01).any()  # ties at the quantile stay


def test_outlier_filter_drops_train_rows_only_and_counts_them(
    project: Path, no_mlflow: None
) -> None:
    params = _params()
    raw = read_raw_splits(params.data)
    valid, _ = clean_prices(raw["train"], params.preprocess.min_price)
    low, high = np.quantile(valid["price"], [0.05, 0.95])
    expected = valid.loc[valid["price"].between(low, high), "sample_id"].tolist()

    metrics, train, test = _run_core(outlier_quantile=0.05)
    assert train["sample_id"].tolist() == expected
    assert metrics["dropped_price_outlier"] == len(valid) - len(expected) > 0
    assert metrics["dropped_total"] == len(BAD_PRICES) + metrics["dropped_price_outlier"]
    assert len(test) == DEMO["n_test"]  # test rows are never filtered


def test_every_option_off_writes_todays_tables(project: Path, no_mlflow: None) -> None:
    params = _params()
    metrics, train, test = _run_core(**TEXT_OPTIONS_OFF)
    valid, _ = clean_prices(read_raw_splits(params.data)["train"], params.preprocess.min_price)
    for table, raw in ((train, valid), (test, read_raw_splits(params.data)["test"])):
        parse_frame(raw)[0].to_parquet(project / "expected.parquet")  # as today's code wrote
        expected = pd.read_parquet(project / "expected.parquet")
        pd.testing.assert_frame_equal(table[expected.columns], expected)
    assert metrics["text_cleaned_train"] == metrics["text_cleaned_test"] == 0


def test_text_options_apply_as_serving_does_and_keep_the_folds(
    project: Path, no_mlflow: None
) -> None:
    _, plain, _ = _run_core(**TEXT_OPTIONS_OFF)
    options = {"remove_emoji": True, "numbers_as_words": True, "text_body": "bullets5"}
    metrics, train, test = _run_core(**options)
    assert train["fold"].tolist() == plain["fold"].tolist()  # folds read the text as written
    assert metrics["text_cleaned_train"] > 0
    assert not train["item_name"].str.contains(r"(?<![A-Za-z0-9])\d", regex=True).any()
    assert train["value"].tolist() == plain["value"].tolist()
    # the served model parses a request with the same options and gets the same text
    cfg = _params(preprocess=options).preprocess
    served, _ = parse_products(read_raw_splits(_params().data)["test"], cfg)
    for column in ("item_name", "description", "text"):
        assert test[column].tolist() == served[column].tolist()


@pytest.mark.parametrize(
    ("options", "message"),
    [({"outlier_quantile": 0.5}, "outlier_quantile"), ({"text_body": "bullets"}, "text_body")],
)
def test_bad_options_are_stage_errors(options: dict, message: str) -> None:
    with pytest.raises(StageError, match=message):
        check_options(_params(preprocess=options).preprocess)
