"""Unit spellings -> a small canonical set -> comparable quantities.

Why: the catalog's `Unit:` line is free text ("Ounce", "oz", "Fl. Oz", "COUNT", "Tea Bags", ...).
Price scales with how much product there is, so a model needs "12 Fl Oz" and "354 millilitre" to
be the same amount. Spellings are mapped to a canonical unit, and canonical units to one base
unit per physical kind (grams, millilitres, items, centimetres, square centimetres).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

QUANTITY_KINDS = ("mass", "volume", "count", "length", "area", "other")

# canonical unit -> (kind, factor to the kind's base unit)
_CANONICAL: dict[str, tuple[str, float]] = {
    "ounce": ("mass", 28.349523125),
    "pound": ("mass", 453.59237),
    "gram": ("mass", 1.0),
    "kilogram": ("mass", 1000.0),
    "milligram": ("mass", 0.001),
    "fl_oz": ("volume", 29.5735295625),
    "millilitre": ("volume", 1.0),
    "litre": ("volume", 1000.0),
    "gallon": ("volume", 3785.411784),
    "quart": ("volume", 946.352946),
    "pint": ("volume", 473.176473),
    "count": ("count", 1.0),
    "inch": ("length", 2.54),
    "foot": ("length", 30.48),
    "centimetre": ("length", 1.0),
    "metre": ("length", 100.0),
    "square_foot": ("area", 929.0304),
    "other": ("other", 1.0),
    "none": ("other", 1.0),
}
CANONICAL_UNITS = tuple(_CANONICAL)

# Spellings after `_clean` (lower case, punctuation to spaces, single spaces). "ounce" is taken as
# mass: the catalog writes liquids as "Fl Oz" and solids as "Ounce".
_SPELLINGS: dict[str, tuple[str, ...]] = {
    "ounce": ("ounce", "ounces", "oz", "ozs", "onzas", "onza", "wt oz", "net wt oz", "oz wt"),
    "pound": ("pound", "pounds", "lb", "lbs", "libra", "libras"),
    "gram": ("gram", "grams", "g", "gr", "grs", "gm", "gms", "gramm", "gramme", "grammes"),
    "kilogram": ("kilogram", "kilograms", "kilogramme", "kg", "kgs", "kilo", "kilos"),
    "milligram": ("milligram", "milligrams", "mg"),
    "fl_oz": (
        "fl oz",
        "fl ozs",
        "floz",
        "fluid ounce",
        "fluid ounces",
        "fl ounce",
        "fl ounces",
        "fluid oz",
    ),
    "millilitre": ("millilitre", "millilitres", "milliliter", "milliliters", "ml", "mls"),
    "litre": ("litre", "litres", "liter", "liters", "l", "lt", "ltr", "ltrs"),
    "gallon": ("gallon", "gallons", "gal", "gals"),
    "quart": ("quart", "quarts", "qt", "qts"),
    "pint": ("pint", "pints", "pt", "pts"),
    # Containers and pieces are counts: "Value: 3, Unit: Jar" means three jars.
    "count": (
        "count",
        "counts",
        "ct",
        "cts",
        "cnt",
        "each",
        "ea",
        "piece",
        "pieces",
        "pc",
        "pcs",
        "unit",
        "units",
        "item",
        "items",
        "pack",
        "packs",
        "pk",
        "packet",
        "packets",
        "bag",
        "bags",
        "tea bag",
        "tea bags",
        "bottle",
        "bottles",
        "jar",
        "jars",
        "can",
        "cans",
        "box",
        "boxes",
        "pouch",
        "pouches",
        "capsule",
        "capsules",
        "tablet",
        "tablets",
        "softgel",
        "softgels",
        "pod",
        "pods",
        "k cup",
        "k cups",
        "sheet",
        "sheets",
        "roll",
        "rolls",
        "bar",
        "bars",
        "stick",
        "sticks",
        "serving",
        "servings",
        "carton",
        "cartons",
        "case",
        "cases",
        "container",
        "containers",
        "tube",
        "tubes",
        "sachet",
        "sachets",
        "pair",
        "pairs",
        "set",
        "sets",
        "dozen",
    ),
    "inch": ("inch", "inches", "in"),
    "foot": ("foot", "feet", "ft"),
    "centimetre": ("centimetre", "centimetres", "centimeter", "centimeters", "cm"),
    "metre": ("metre", "metres", "meter", "meters", "m"),
    "square_foot": ("square foot", "square feet", "sq ft", "sqft", "sq feet", "ft2"),
    "none": ("none", "null", "nan", "n a", "na", "no unit"),
}

_LOOKUP: dict[str, str] = {
    spelling: unit for unit, spellings in _SPELLINGS.items() for spelling in spellings
}
_PUNCT = re.compile(r"[^a-z0-9]+")


def _clean(raw: str) -> str:
    """Case, punctuation and spacing carry no meaning in unit spellings ("Fl. Oz" = "fl oz")."""
    return _PUNCT.sub(" ", raw.lower()).strip()


def normalize_unit(raw: str | None) -> str:
    """Map a raw `Unit:` spelling to a canonical unit; unknown spellings become "other".

    None, empty and explicit "None" all mean the product has no unit ("none"): the distinction
    between "no Unit line" and "Unit: None" is kept by the parser's `unit_missing` flag instead.
    """
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        return "none"
    cleaned = _clean(str(raw))
    if not cleaned:
        return "none"
    unit = _LOOKUP.get(cleaned)
    if unit is None and cleaned.endswith("s"):
        unit = _LOOKUP.get(cleaned[:-1])
    return unit or "other"


def unit_kind(unit: str) -> str:
    """Physical kind of a canonical unit (a raw spelling is normalised first)."""
    entry = _CANONICAL.get(unit) or _CANONICAL[normalize_unit(unit)]
    return entry[0]


def to_canonical(value: float, unit: str) -> tuple[float, str]:
    """(quantity in the kind's base unit, kind): grams, millilitres, items, cm, cm², or as is.

    `unit` should be canonical; a raw spelling is accepted and normalised, so callers holding
    either get the same answer. A NaN value stays NaN: the caller decides on a default.
    """
    kind, factor = _CANONICAL.get(unit) or _CANONICAL[normalize_unit(unit)]
    return float(value) * factor, kind


def canonical_quantities(
    values: np.ndarray | Sequence[float], units: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `to_canonical` over columns of canonical units (for whole frames)."""
    values = np.asarray(values, dtype=np.float64)
    table = {unit: _CANONICAL.get(unit) or _CANONICAL[normalize_unit(unit)] for unit in set(units)}
    factors = np.fromiter((table[u][1] for u in units), dtype=np.float64, count=len(units))
    kinds = np.array([table[u][0] for u in units], dtype=object)
    return values * factors, kinds


def unit_table(unit_raw: Sequence[str | None], unit: Sequence[str]) -> pd.DataFrame:
    """Rows per (raw spelling, canonical unit), most frequent first: shows what got mapped where.

    Missing raw spellings appear as "<missing>" so they are visible next to explicit "None".
    """
    frame = pd.DataFrame(
        {
            "unit_raw": ["<missing>" if r is None else str(r) for r in unit_raw],
            "unit": list(unit),
        }
    )
    table = frame.value_counts(["unit_raw", "unit"]).rename("rows").reset_index()
    table["share"] = table["rows"] / max(len(frame), 1)
    return table.sort_values(["rows", "unit_raw"], ascending=[False, True], ignore_index=True)
