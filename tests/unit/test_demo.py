from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pricefuse.core.config import DemoConfig
from pricefuse.data.catalog import parse_frame
from pricefuse.data.demo import GOLD, generate_demo
from tests.support import project_params

DEMO = project_params().demo


def demo_config(**changes: object) -> DemoConfig:
    """params.yaml's demo section with `changes`."""
    return replace(DEMO, **changes)


CFG = demo_config(
    n_train=600,
    n_test=150,
    image_size=64,
    broken_link_rate=0.02,
    corrupt_image_rate=0.02,
    missing_image_rate=0.1,
)


def _image_status(link: str) -> str:
    if not link:
        return "missing"
    path = Path(link)
    if not path.is_file():
        return "broken"
    try:
        with Image.open(path) as image:
            image.load()
    except OSError:
        return "corrupt"
    return "ok"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    out = tmp_path_factory.mktemp("demo") / "raw"
    summary = generate_demo(CFG, seed=3, out_dir=out)
    train = pd.read_csv(out / "train.csv", keep_default_na=False)
    test = pd.read_csv(out / "test.csv", keep_default_na=False)
    return train, test, summary


def test_columns_ids_and_prices(demo) -> None:
    train, test, summary = demo
    assert list(train.columns) == ["sample_id", "catalog_content", "image_link", "price"]
    assert list(test.columns) == ["sample_id", "catalog_content", "image_link"]
    assert (len(train), len(test)) == (CFG.n_train, CFG.n_test)
    assert train["sample_id"].is_unique and test["sample_id"].is_unique
    assert not set(train["sample_id"]) & set(test["sample_id"])
    prices = train["price"].to_numpy(dtype=float)
    assert np.isfinite(prices).all() and (prices > 0).all()
    assert np.allclose(prices, np.round(prices, 2))
    assert prices.max() / prices.min() > 50  # heavy tail, like the real catalog
    assert "600 train and 150 test rows" in summary


def test_catalog_format_parses(demo) -> None:
    train, test, _ = demo
    rows = pd.concat([train, test], ignore_index=True)
    assert rows["catalog_content"].str.startswith("Item Name: ").all()
    parsed, report = parse_frame(rows)
    n = len(rows)
    assert (parsed["item_name"] != "").all()
    assert report.unit_coverage == 1.0
    # A few deliberately malformed rows, but most carry a Value and a Unit.
    assert 0 < report.counts["value_missing"] <= 0.05 * n
    assert 0 < report.counts["unit_missing"] <= 0.03 * n
    assert report.counts["unit_none"] > 0
    assert report.counts["pack_found"] > 0.2 * n
    assert report.counts["no_bullets"] > 0 and report.counts["no_description"] > 0
    spellings = Counter(parsed["unit_raw"].dropna())
    assert len(spellings) >= 12
    assert set(parsed["quantity_kind"]) >= {"mass", "volume", "count"}


def test_image_faults_match_config(demo) -> None:
    train, test, _ = demo
    links = pd.concat([train["image_link"], test["image_link"]]).tolist()
    status = Counter(_image_status(link) for link in links)
    n = len(links)
    assert status["missing"] == round(CFG.missing_image_rate * n)
    assert status["broken"] == round(CFG.broken_link_rate * n)
    assert status["corrupt"] == round(CFG.corrupt_image_rate * n)
    assert status["ok"] == n - status["missing"] - status["broken"] - status["corrupt"]
    good = next(link for link in links if _image_status(link) == "ok")
    with Image.open(good) as image:
        assert image.size == (CFG.image_size, CFG.image_size)
        assert image.format == "JPEG"


def test_relisted_products_share_text_and_image(demo) -> None:
    train, _, _ = demo
    repeated = train[train["catalog_content"].duplicated(keep=False)]
    assert len(repeated) > 0
    same = repeated.groupby("catalog_content")["image_link"].nunique()
    assert (same == 1).all()


def test_gold_border_marks_pricier_products(demo) -> None:
    train, _, _ = demo
    gold = []
    for link in train["image_link"]:
        if _image_status(link) != "ok":
            gold.append(None)
            continue
        with Image.open(link) as image:
            corner = np.asarray(image.convert("RGB"))[1, 1].astype(int)
        gold.append(bool(np.abs(corner - np.array(GOLD)).max() < 40))
    frame = train.assign(gold=gold).dropna(subset=["gold"])
    share = frame["gold"].mean()
    assert 0.1 < share < 0.5
    by_tier = frame.groupby("gold")["price"].median()
    assert by_tier[True] > 1.4 * by_tier[False]


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_same_bytes_and_relative_links(tmp_path: Path, monkeypatch) -> None:
    small = demo_config(n_train=60, n_test=15, image_size=48)
    trees = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        generate_demo(small, seed=11, out_dir=Path("data/raw/demo"))
        trees.append(_all_bytes(tmp_path / name / "data/raw/demo"))
    assert trees[0] == trees[1]
    assert {"train.csv", "test.csv"} <= set(trees[0])
    train = pd.read_csv(tmp_path / "b/data/raw/demo/train.csv", keep_default_na=False)
    links = [link for link in train["image_link"] if link]
    assert links and all(link.startswith("data/raw/demo/images/") for link in links)
    generate_demo(small, seed=12, out_dir=Path("data/raw/demo"))
    assert _all_bytes(tmp_path / "b/data/raw/demo") != trees[1]


def test_regeneration_removes_stale_images(tmp_path: Path) -> None:
    cfg = demo_config(n_train=80, n_test=20, image_size=40, broken_link_rate=0.1)
    generate_demo(cfg, seed=1, out_dir=tmp_path)
    generate_demo(cfg, seed=2, out_dir=tmp_path)
    train = pd.read_csv(tmp_path / "train.csv", keep_default_na=False)
    test = pd.read_csv(tmp_path / "test.csv", keep_default_na=False)
    links = pd.concat([train["image_link"], test["image_link"]])
    broken = sum(_image_status(link) == "broken" for link in links)
    assert broken == round(0.1 * 100)


@pytest.mark.parametrize(
    "bad",
    [
        demo_config(n_train=5),
        demo_config(n_test=0),
        demo_config(image_size=8),
        demo_config(missing_image_rate=0.6),
        demo_config(broken_link_rate=-0.1),
    ],
)
def test_invalid_config_is_rejected(bad: DemoConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="demo"):
        generate_demo(bad, seed=0, out_dir=tmp_path)


def test_long_text_is_competition_like_and_keeps_every_parsed_field(tmp_path: Path) -> None:
    """`long_text` (the scale benchmark's rows): median ~630 characters and a large vocabulary,
    while prices, links and what the parser reads (name, value, unit) stay as without it."""
    cfg = demo_config(n_train=800, n_test=200, image_size=40)
    generate_demo(cfg, seed=3, out_dir=tmp_path / "short")
    generate_demo(replace(cfg, long_text=True), seed=3, out_dir=tmp_path / "long")
    short = pd.read_csv(tmp_path / "short" / "train.csv", keep_default_na=False)
    long = pd.read_csv(tmp_path / "long" / "train.csv", keep_default_na=False)
    lengths = long["catalog_content"].str.len()
    assert 500 <= lengths.median() <= 750
    assert lengths.quantile(0.9) > 1.4 * lengths.median()  # a long tail, as in the real rows
    vocabulary = {w for text in long["catalog_content"] for w in text.lower().split()}
    assert len(vocabulary) > 5_000
    assert short["catalog_content"].str.len().median() < 350
    assert short["price"].tolist() == long["price"].tolist()
    parsed_short, parsed_long = parse_frame(short)[0], parse_frame(long)[0]
    for column in ("item_name", "value", "unit", "pack"):
        assert parsed_short[column].equals(parsed_long[column]), column


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_image_share_keeps_that_share_of_links_and_renders_only_theirs(
    share: float, tmp_path: Path
) -> None:
    cfg = demo_config(n_train=1500, n_test=500, image_size=32, missing_image_rate=0.0)
    generate_demo(replace(cfg, image_share=share), seed=4, out_dir=tmp_path)
    rows = pd.concat(
        [pd.read_csv(tmp_path / f"{s}.csv", keep_default_na=False) for s in ("train", "test")]
    )
    linked = rows["image_link"] != ""
    assert abs(linked.mean() - share) < 0.03
    rendered = {p.name for p in (tmp_path / "images").glob("*.jpg")}
    assert rendered <= {Path(link).name for link in rows.loc[linked, "image_link"]}


def test_image_share_must_be_a_fraction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_share"):
        generate_demo(demo_config(image_share=0.0), seed=0, out_dir=tmp_path)
