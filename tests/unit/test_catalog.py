import math
import time

import numpy as np
import pandas as pd
import pytest

from pricefuse.data.catalog import (
    PACK_MAX,
    PARSED_COLUMNS,
    VALUE_DEFAULT,
    VALUE_MAX,
    CatalogFields,
    format_catalog,
    parse_catalog,
    parse_frame,
    parse_pack,
)

FULL = (
    "Item Name: Acme Trail Mix, Salted, 8 Ounce (Pack of 3)\n"
    "Bullet Point 1: Roasted nuts: crunchy and salty\n"
    "Bullet Point 2: Resealable bag\n"
    "Product Description: A mix of nuts\n"
    "and dried fruit.\n"
    "Value: 24.0\n"
    "Unit: Ounce\n"
)


def test_parse_full_record() -> None:
    fields = parse_catalog(FULL)
    assert fields.item_name == "Acme Trail Mix, Salted, 8 Ounce (Pack of 3)"
    assert fields.bullets == ("Roasted nuts: crunchy and salty", "Resealable bag")
    assert fields.description == "A mix of nuts and dried fruit."  # wrapped line joined
    assert fields.value == 24.0
    assert fields.unit_raw == "Ounce"
    assert fields.text.splitlines() == [
        "Acme Trail Mix, Salted, 8 Ounce (Pack of 3)",
        "Roasted nuts: crunchy and salty",
        "Resealable bag",
        "A mix of nuts and dried fruit.",
    ]


def test_unnumbered_and_empty_bullets() -> None:
    text = "Item Name: Tea\nBullet Point: first\nBullet Point 2:\nBullet Point:second\nValue: 20\n"
    fields = parse_catalog(text)
    assert fields.bullets == ("first", "second")
    assert fields.unit_raw is None


def test_keys_are_case_and_space_tolerant() -> None:
    fields = parse_catalog("  item name :  Soap\nVALUE: 3\nunit:  Count  \n")
    assert (fields.item_name, fields.value, fields.unit_raw) == ("Soap", 3.0, "Count")


@pytest.mark.parametrize(
    ("value_line", "expected"),
    [
        ("Value: 72.0", 72.0),
        ("Value: 11.4", 11.4),
        ("Value: 1,000", 1000.0),
        ("Value: 12 oz", 12.0),
        ("Value: .5", 0.5),
        ("Value: 0", 0.0),
        ("Value: nan", None),
        ("Value: ", None),
        ("Value: abc", None),
        ("Value: -3", None),
        ("Value: inf", None),
        ("Value: 5each", 5.0),  # "e" starts a word, not an exponent
        ("Value: 1.5e3", 1500.0),
        ("Value: 1e-320", 1e-320),  # tiny but finite and in range
        (f"Value: {VALUE_MAX:g}", VALUE_MAX),
        # garbled: no guess at what was meant
        ("Value: 12..5", None),
        ("Value: 1.2.3", None),
        ("Value: 5e", None),
        ("Value: 5e+ oz", None),
        ("Value: \u0661\u0662", None),  # Arabic-Indic digits
        ("Value: 1\u0662", None),
        # out of range: would overflow float32 features downstream
        ("Value: 1e308", None),
        (f"Value: {VALUE_MAX * 1.001:g}", None),
        ("Value: " + "9" * 400, None),
        ("Value: -0.5", None),
    ],
)
def test_value_parsing(value_line: str, expected: float | None) -> None:
    fields = parse_catalog(f"Item Name: X\n{value_line}\nUnit: Ounce\n")
    assert fields.value == expected


def test_last_value_and_unit_win() -> None:
    fields = parse_catalog("Item Name: X\nValue: 1\nUnit: oz\nValue: 2\nUnit: lb\n")
    assert (fields.value, fields.unit_raw) == (2.0, "lb")


@pytest.mark.parametrize("blob", [None, float("nan"), 5, "", "   \n  "])
def test_non_text_gives_empty_fields(blob: object) -> None:
    assert parse_catalog(blob) == CatalogFields()


def test_free_text_becomes_item_name() -> None:
    fields = parse_catalog("Organic honey 16 oz jar\nraw and unfiltered")
    assert fields.item_name == "Organic honey 16 oz jar raw and unfiltered"
    assert fields.value is None and fields.unit_raw is None


def test_text_before_item_name_goes_to_description() -> None:
    fields = parse_catalog("stray header\nItem Name: Soap\nProduct Description: mild\n")
    assert fields.item_name == "Soap"
    assert fields.description == "stray header mild"


def test_line_after_value_is_not_a_number() -> None:
    fields = parse_catalog("Item Name: X\nValue: 5\n7 more words\nUnit: ct\n")
    assert fields.value == 5.0 and fields.item_name == "X"


@pytest.mark.parametrize(
    ("name", "pack"),
    [
        ("Acme Salsa Verde, 9 Ounce (Pack of 6)", 6),
        ("Zeta Crackers 7 Ounce (pack of 4)", 4),
        ("Orbit Espresso, 2-Pack (10oz Bags)", 2),
        ("Nimbus Rooibos (40 tea bags) - 3 Pack", 3),
        ("Quill Granola Bites 12pk", 12),
        ("Lumen Tealights, Set of 2", 2),
        ("Delta Tuna Chunks, 5 OZ Can (Case of 18)", 18),
        ("Vesta Rice Vinegar, 10 Ounce - 8 per case.", 8),
        ("Kappa Vanilla Syrup (6x3 OZ)", 6),
        ("Sigma Lemonade Powder (2 x 9.5 oz. Sachets)", 2),
        ("Rho Mint Tea, 4 x 25 Ct", 4),
        ("Tau Coffee Pods 36 Count", 1),  # contents, not a multipack
        ("Box of 80 Herbal Tea Bags", 1),  # contents, not a multipack
        ("Notebook Paper 8.5 x 11 inch", 1),  # dimensions
        ("Pi Kosher Salt 40 oz (1 Pack)", 1),
        ("Chi Electrolyte Mix, 12-Packet Box (Pack of 30)", 30),
        ("Weird (Pack of 0)", 1),
        ("Huge Pack of 1e9", 1),
        ("Negative Pack of -3", 1),
        (f"Too many Pack of {PACK_MAX + 1}", 1),
        (f"Just enough Pack of {PACK_MAX}", PACK_MAX),
        ("Pack of \u0661\u0662", 1),  # only ASCII digits count
        ("Plain Name", 1),
        ("", 1),
    ],
)
def test_parse_pack(name: str, pack: int) -> None:
    assert parse_pack(name) == pack


def test_parse_pack_non_text() -> None:
    assert parse_pack(None) == 1
    assert parse_pack(float("nan")) == 1


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": [10, 11, 12, 13, 14],
            "catalog_content": [
                FULL,
                "Item Name: Water 16.9 Fl Oz, 24-Pack\nValue: 405.6\nUnit: Fl. Oz\n",
                "Item Name: Mystery box\nValue: nan\nUnit: None\n",
                "Item Name: No value\nUnit: furlong\n",
                None,
            ],
            "price": [5.0, 6.0, 7.0, 8.0, 9.0],
        },
        index=[4, 3, 2, 1, 0],
    )


def test_parse_frame_columns_order_and_defaults() -> None:
    raw = _frame()
    out, _ = parse_frame(raw)
    assert list(out.index) == list(raw.index)
    assert list(out["sample_id"]) == [10, 11, 12, 13, 14]
    assert set(PARSED_COLUMNS) | {"sample_id", "catalog_content", "price"} == set(out.columns)
    assert list(out["unit"]) == ["ounce", "fl_oz", "none", "other", "none"]
    assert list(out["pack"]) == [3, 24, 1, 1, 1]
    assert list(out["value_missing"]) == [0, 0, 1, 1, 1]
    assert list(out["unit_missing"]) == [0, 0, 0, 0, 1]
    assert list(out["value"]) == [24.0, 405.6, VALUE_DEFAULT, VALUE_DEFAULT, VALUE_DEFAULT]
    assert out.loc[4, "quantity"] == pytest.approx(24 * 28.349523125)
    assert out.loc[3, "quantity_kind"] == "volume"
    assert out.loc[4, "log_quantity"] == pytest.approx(math.log1p(out.loc[4, "quantity"]))
    assert list(out["n_bullets"]) == [2, 0, 0, 0, 0]
    assert out.loc[4, "bullets"] == ["Roasted nuts: crunchy and salty", "Resealable bag"]
    assert out.loc[0, "item_name"] == "" and out.loc[0, "text"] == ""
    assert list(out["text_len"]) == [len(t) for t in out["text"]]
    assert np.isfinite(out[["value", "quantity", "log_quantity"]].to_numpy()).all()


def test_parse_report_counts_and_metrics() -> None:
    _, report = parse_frame(_frame())
    counts = report.counts
    assert counts["rows"] == 5
    assert counts["empty_text"] == 1
    assert counts["item_name_missing"] == 1
    assert counts["value_missing"] == 3
    assert counts["value_malformed"] == 0  # "nan" and absent lines are missing, not malformed
    assert counts["unit_missing"] == 1
    assert counts["unit_none"] == 1
    assert counts["unit_unrecognised"] == 1
    assert counts["pack_found"] == 2
    assert report.unit_coverage == pytest.approx(3 / 4)
    metrics = report.as_metrics()
    assert metrics["parse_unit_coverage"] == pytest.approx(0.75)
    assert metrics["parse_rows"] == 5.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_parse_frame_counts_malformed_value() -> None:
    raw = pd.DataFrame({"catalog_content": ["Item Name: A\nValue: twelve\nUnit: oz\n"]})
    out, report = parse_frame(raw)
    assert report.counts["value_malformed"] == 1
    assert out["value_missing"].tolist() == [1]


def test_parse_frame_tells_garbled_from_out_of_range_values() -> None:
    raw = pd.DataFrame(
        {"catalog_content": [f"Item Name: A\nValue: {v}\nUnit: lb\n" for v in ("12..5", "1e308")]}
    )
    out, report = parse_frame(raw)
    assert (report.counts["value_malformed"], report.counts["value_out_of_range"]) == (1, 1)
    assert out["value"].tolist() == [VALUE_DEFAULT, VALUE_DEFAULT]
    assert out["value_missing"].tolist() == [1, 1]
    assert np.isfinite(out[["quantity", "log_quantity"]].to_numpy(np.float32)).all()


def test_huge_hostile_text_parses_in_linear_time() -> None:
    """A long run of spaces after a digit made the pack pattern backtrack quadratically (16k
    spaces took 1.5 s, a 1 MB request would have held a worker for hours)."""
    name = "Item Name: 1" + " " * 200_000 + "z\n" + "Value: " + "1" * 100_000
    started = time.perf_counter()
    fields = parse_catalog(name)
    assert parse_pack(fields.item_name) == 1 and fields.value is None
    assert time.perf_counter() - started < 2.0


def test_lone_surrogates_become_encodable() -> None:
    fields = parse_catalog("Item Name: tea \ud800 bags\nValue: 3\n")
    assert fields.item_name == "tea ? bags" and fields.value == 3.0
    fields.text.encode("utf-8")


def test_parse_frame_replaces_stale_parsed_columns() -> None:
    raw = pd.DataFrame({"catalog_content": [FULL], "unit": ["stale"]})
    out, _ = parse_frame(raw)
    assert out["unit"].tolist() == ["ounce"]
    assert list(out.columns).count("unit") == 1


def test_parse_frame_requires_catalog_content() -> None:
    with pytest.raises(ValueError, match="catalog_content"):
        parse_frame(pd.DataFrame({"text": ["x"]}))


def test_empty_frame() -> None:
    out, report = parse_frame(pd.DataFrame({"catalog_content": pd.Series([], dtype=object)}))
    assert len(out) == 0 and report.unit_coverage == 1.0


def test_format_catalog_round_trip() -> None:
    text = format_catalog("Acme Soap, 3 Count", ["gentle", "unscented"], "A bar.", 3.0, "ct")
    assert text.endswith("Value: 3.0\nUnit: ct\n")
    fields = parse_catalog(text)
    assert fields == CatalogFields(
        "Acme Soap, 3 Count", ("gentle", "unscented"), "A bar.", 3.0, "ct", "3.0"
    )
    assert "Value" not in format_catalog("X", value=None, unit="oz")
    assert format_catalog("X", value=22.799999999999997).splitlines()[1] == "Value: 22.8"
