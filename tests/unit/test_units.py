import math

import numpy as np
import pytest

from pricefuse.data.units import (
    CANONICAL_UNITS,
    QUANTITY_KINDS,
    canonical_quantities,
    normalize_unit,
    to_canonical,
    unit_kind,
    unit_table,
)

# The spellings seen in the competition's Unit lines (plus a few obvious variants).
SPELLINGS = {
    "Ounce": "ounce",
    "ounce": "ounce",
    "oz": "ounce",
    "Oz": "ounce",
    "OZ": "ounce",
    "Ounces": "ounce",
    "ounces": "ounce",
    "Fl Oz": "fl_oz",
    "fl oz": "fl_oz",
    "Fl. Oz": "fl_oz",
    "FL OZ": "fl_oz",
    "FL Oz": "fl_oz",
    "Fl oz": "fl_oz",
    "Fl Oz ": "fl_oz",
    "fl.oz": "fl_oz",
    "Fluid Ounce": "fl_oz",
    "Fluid Ounces": "fl_oz",
    "Count": "count",
    "count": "count",
    "COUNT": "count",
    "ct": "count",
    "Each": "count",
    "each": "count",
    "Jar": "count",
    "bottle": "count",
    "Bottle": "count",
    "Can": "count",
    "Box": "count",
    "Packet": "count",
    "Pack": "count",
    "packs": "count",
    "Tea Bags": "count",
    "K-Cups": "count",
    "pound": "pound",
    "Pound": "pound",
    "lb": "pound",
    "lbs": "pound",
    "gram": "gram",
    "Gram": "gram",
    "grams": "gram",
    "gramm": "gram",
    "g": "gram",
    "kg": "kilogram",
    "mg": "milligram",
    "millilitre": "millilitre",
    "milliliter": "millilitre",
    "ml": "millilitre",
    "Liters": "litre",
    "litre": "litre",
    "Gallon": "gallon",
    "qt": "quart",
    "Pint": "pint",
    "Inch": "inch",
    "feet": "foot",
    "cm": "centimetre",
    "Meter": "metre",
    "Sq Ft": "square_foot",
    "None": "none",
}


@pytest.mark.parametrize(("raw", "expected"), sorted(SPELLINGS.items()))
def test_normalize_unit_maps_real_spellings(raw: str, expected: str) -> None:
    assert normalize_unit(raw) == expected


@pytest.mark.parametrize("raw", [None, "", "   ", float("nan"), "NONE", "n/a"])
def test_absent_units_are_none(raw: object) -> None:
    assert normalize_unit(raw) == "none"  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["furlong", "bushel of apples", "12"])
def test_unknown_units_are_other(raw: str) -> None:
    assert normalize_unit(raw) == "other"


def test_canonical_units_all_have_a_known_kind() -> None:
    outputs = set(SPELLINGS.values()) | {"other", "none"}
    assert outputs <= set(CANONICAL_UNITS)
    assert {unit_kind(u) for u in CANONICAL_UNITS} <= set(QUANTITY_KINDS)


@pytest.mark.parametrize(
    ("value", "unit", "quantity", "kind"),
    [
        (1.0, "pound", 453.59237, "mass"),
        (16.0, "ounce", 453.59237, "mass"),
        (2.5, "kilogram", 2500.0, "mass"),
        (500.0, "milligram", 0.5, "mass"),
        (12.0, "fl_oz", 354.882, "volume"),
        (2.0, "litre", 2000.0, "volume"),
        (1.0, "gallon", 3785.411784, "volume"),
        (24.0, "count", 24.0, "count"),
        (12.0, "inch", 30.48, "length"),
        (1.0, "square_foot", 929.0304, "area"),
        (7.0, "other", 7.0, "other"),
        (7.0, "none", 7.0, "other"),
    ],
)
def test_to_canonical_conversions(value: float, unit: str, quantity: float, kind: str) -> None:
    got_quantity, got_kind = to_canonical(value, unit)
    assert got_kind == kind
    assert got_quantity == pytest.approx(quantity, rel=1e-4)


def test_to_canonical_accepts_raw_spellings_and_keeps_nan() -> None:
    assert to_canonical(12.0, "Fl. Oz") == to_canonical(12.0, "fl_oz")
    quantity, kind = to_canonical(float("nan"), "gram")
    assert math.isnan(quantity) and kind == "mass"


def test_canonical_quantities_matches_scalar_version() -> None:
    units = ["ounce", "fl_oz", "count", "none", "pound", "ounce"]
    values = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 8.0])
    quantities, kinds = canonical_quantities(values, units)
    for v, u, q, k in zip(values, units, quantities, kinds, strict=True):
        expected_quantity, expected_kind = to_canonical(v, u)
        assert k == expected_kind
        assert q == pytest.approx(expected_quantity)


def test_unit_table_counts_spellings_and_missing() -> None:
    table = unit_table(["Ounce", "oz", "Ounce", None], ["ounce", "ounce", "ounce", "none"])
    rows = {(r.unit_raw, r.unit): r.rows for r in table.itertuples()}
    assert rows == {("Ounce", "ounce"): 2, ("oz", "ounce"): 1, ("<missing>", "none"): 1}
    assert table.iloc[0]["unit_raw"] == "Ounce"
    assert table["share"].sum() == pytest.approx(1.0)
