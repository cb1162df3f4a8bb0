"""Parse `catalog_content` into fields, units and pack counts.

Why a hand parser: the competition packs every product attribute into one text blob of
`Key: value` lines (`Item Name:`, `Bullet Point 1:`..., `Product Description:`, `Value:`,
`Unit:`). Price depends mostly on what those lines say about quantity (value x unit x pack) and
kind of product, so they are pulled out into typed columns. The same function runs in preprocess
and in the served model, so it must never raise: anything missing or malformed gets a default
and is counted in a `ParseReport`, which makes data-quality drift visible in MLflow.

Documented defaults (the served model relies on them: a row is priced, never refused, for what
its text says). Each is counted in the `ParseReport` under the name in brackets:

- no `Value:` line, or `nan`/`none`/`null`/`n/a`/empty -> value 1.0, `value_missing` 1
  [value_missing];
- Value not a number (`abc`, `12..5`, `1.2.3`, `5e`, digits of another script such as `١٢`)
  -> value 1.0, `value_missing` 1 [value_malformed];
- Value negative, NaN, infinite or above `VALUE_MAX` (`1e308`, 400 digits) -> value 1.0,
  `value_missing` 1 [value_out_of_range];
- Unit line missing / `None` / an unknown spelling -> unit `none` / `none` / `other`
  [unit_missing / unit_none / unit_unrecognised];
- a pack count outside [1, `PACK_MAX`] (`Pack of 0`, `Pack of -3`, `Pack of 1e9`) -> pack 1;
- text that is not a string, empty or only whitespace -> empty fields and the defaults above
  [empty_text];
- lone surrogates (what JSON's `\\ud800` escapes decode to) -> `?`.

Only ASCII digits count in Value and pack numbers, and every pattern runs in time linear in the
text, so a huge or hostile string costs its length, nothing more. With Value bounded, `quantity`
(at most `VALUE_MAX` gallons in millilitres) and every log feature stay finite in float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pricefuse.data.units import canonical_quantities, normalize_unit

VALUE_DEFAULT = 1.0  # used when Value is missing: "one of whatever the unit is"
# Largest Value taken as a quantity. The real rows stay below 5e4; anything past 1e7 is a product
# code or a typo, and keeping it would overflow float32 features (1e308 -> inf) downstream.
VALUE_MAX = 1e7

PARSED_COLUMNS = (
    "item_name",
    "bullets",
    "description",
    "value",
    "unit_raw",
    "unit",
    "pack",
    "quantity",
    "quantity_kind",
    "log_quantity",
    "n_bullets",
    "text_len",
    "text",
    "value_missing",
    "unit_missing",
)

_KEY_LINE = re.compile(
    r"^\s*(item name|bullet point(?:\s*\d+)?|product description|value|unit)\s*:[ \t]?(.*)$",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[-+]?[0-9]+)?", re.IGNORECASE)
# What may not directly follow a number (matched at the number's end) for it to count: a further
# point or digit ("12..5", "1.2.3", "1٢"), or a dangling exponent ("5e", "5e+").
_GARBLED_TAIL = re.compile(r"(?:[.\d]|e[-+]?(?:\s|$))", re.IGNORECASE)
_NULL_TOKENS = frozenset({"", "nan", "none", "null", "n/a", "na"})

# Pack patterns, most explicit first; the first family that matches wins.
_UNIT_AFTER_X = r"(?:fl\.?\s*oz|oz|ounces?|ct|count|g|grams?|kg|ml|l|lbs?|pounds?|liters?|litres?)"
_PACK_PATTERNS = (
    re.compile(r"\b(?:pack|set|case|bundle|lot|carton|pk)\s+of\s+([0-9]{1,4})\b", re.I),
    # not `\s*-?\s*`: two adjacent \s* backtrack quadratically on a long run of spaces
    re.compile(r"\b([0-9]{1,4})\s*(?:-\s*)?(?:packs?|pk|pks)\b", re.I),
    re.compile(r"\b([0-9]{1,4})\s+per\s+(?:case|pack|box|carton)\b", re.I),
    re.compile(r"\b([0-9]{1,3})\s*[x×]\s*\d+(?:\.\d+)?\s*" + _UNIT_AFTER_X + r"\b", re.I),
)
PACK_MAX = 1000  # larger "packs" are product codes or counts of contents, not multipacks


@dataclass(frozen=True)
class CatalogFields:
    """One product's catalog fields. `value_raw` keeps the Value text to tell missing from bad."""

    item_name: str = ""
    bullets: tuple[str, ...] = ()
    description: str = ""
    value: float | None = None
    unit_raw: str | None = None
    value_raw: str | None = None

    @property
    def text(self) -> str:
        """The encoder input: item name, bullets and description, one per line."""
        parts = [self.item_name, *self.bullets, self.description]
        return "\n".join(p for p in parts if p)


def _read_number(raw: str | None) -> float | None:
    """The number the Value text starts with ("12.0", "1,000", "12 oz"), or None when it does not
    start with one or the number is garbled (see `_GARBLED_TAIL`). Range is not checked here."""
    if raw is None:
        return None
    text = raw.strip().replace(",", "")
    match = _NUMBER.match(text)
    if match is None or _GARBLED_TAIL.match(text, match.end()):
        return None
    return float(match.group(0))  # the pattern only admits what float() reads


def _in_range(number: float | None) -> bool:
    return number is not None and math.isfinite(number) and 0.0 <= number <= VALUE_MAX


def _parse_value(raw: str | None) -> float | None:
    """A number in [0, VALUE_MAX] from the Value text, or None (missing, garbled, out of range)."""
    number = _read_number(raw)
    return number if _in_range(number) else None


def _valid_unicode(text: str) -> str:
    """`text` encodable as UTF-8: lone surrogates (which JSON's `\\ud800` escapes produce) become
    "?", because tokenizers and response encoders fail on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def parse_catalog(text: object) -> CatalogFields:
    """Split one `catalog_content` blob into fields. Never raises.

    Lines that do not start with a known key continue the previous field (wrapped descriptions);
    text before the first key becomes the item name when there is no `Item Name:` line, so free
    text sent to the served model still yields something to encode. When Value or Unit appears
    more than once the last one wins: the competition writes them as the closing lines.
    """
    if not isinstance(text, str) or not text.strip():
        return CatalogFields()
    text = _valid_unicode(text)
    item_name: list[str] = []
    preamble: list[str] = []
    bullets: list[list[str]] = []
    description: list[str] = []
    value_raw: str | None = None
    unit_raw: str | None = None
    current: list[str] | None = None
    for line in text.splitlines():
        match = _KEY_LINE.match(line)
        if match is None:
            stripped = line.strip()
            if stripped:
                (current if current is not None else preamble).append(stripped)
            continue
        key = match.group(1).lower()
        content = match.group(2).strip()
        if key == "item name":
            current = item_name
        elif key.startswith("bullet"):
            current = []
            bullets.append(current)
        elif key == "product description":
            current = description
        else:
            if key == "value":
                value_raw = content
            else:
                unit_raw = content or None
            current = None  # a wrapped line after Value/Unit is stray text, not a number
            continue
        if content:
            current.append(content)
    name = " ".join(item_name)
    desc_parts = description
    if not name:
        name = " ".join(preamble)
    elif preamble:
        desc_parts = [*preamble, *description]
    return CatalogFields(
        item_name=name,
        bullets=tuple(b for b in (" ".join(parts) for parts in bullets) if b),
        description=" ".join(desc_parts),
        value=_parse_value(value_raw),
        unit_raw=unit_raw,
        value_raw=value_raw,
    )


def parse_pack(item_name: object) -> int:
    """Number of units sold together, from the item name; 1 when the name does not say.

    "Pack of 6", "6-Pack", "6 Pack", "6pk", "Set of 2", "Case of 12", "12 per case" and
    "6 x 4 oz" count as packs. "24 Count" and "Box of 100 Tea Bags" do not: they describe the
    contents, which the catalog already puts in Value/Unit.
    """
    if not isinstance(item_name, str) or not item_name:
        return 1
    for pattern in _PACK_PATTERNS:
        for match in pattern.finditer(item_name):
            number = int(match.group(1))
            if 1 <= number <= PACK_MAX:
                return number
    return 1


@dataclass
class ParseReport:
    """What parsing had to default or could not recognise, for MLflow and drift checks."""

    counts: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.counts.get("rows", 0)

    @property
    def unit_coverage(self) -> float:
        """Share of rows with a Unit line whose spelling maps to a known unit (1.0 if none)."""
        with_unit = self.rows - self.counts.get("unit_missing", 0)
        if with_unit <= 0:
            return 1.0
        return 1.0 - self.counts.get("unit_unrecognised", 0) / with_unit

    def as_metrics(self, prefix: str = "parse_") -> dict[str, float]:
        metrics = {f"{prefix}{key}": float(value) for key, value in self.counts.items()}
        metrics[f"{prefix}unit_coverage"] = self.unit_coverage
        return metrics


def _is_null_token(raw: str | None) -> bool:
    return raw is None or raw.strip().lower() in _NULL_TOKENS


def _count(flags: Iterable[bool]) -> int:
    return int(sum(1 for f in flags if f))


def parse_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, ParseReport]:
    """Parse every row's `catalog_content`; input columns are kept, row order and index too.

    Defaults (listed in the module docstring): value 1.0 (`value_missing` = 1), unit "none"
    (`unit_missing` = 1), pack 1, empty strings for text fields. `quantity` is Value in the
    kind's base unit (grams, millilitres, items, ...); Value is sometimes the pack total and
    sometimes per unit, so `pack` is kept as its own column for models to combine rather than
    multiplied in here.
    """
    if "catalog_content" not in df.columns:
        raise ValueError(
            f"parse_frame needs a 'catalog_content' column; got {', '.join(map(str, df.columns))}"
        )
    raw_texts = df["catalog_content"].tolist()
    fields = [parse_catalog(t) for t in raw_texts]
    n = len(fields)
    unit_raw = [f.unit_raw for f in fields]
    unit_cache = {raw: normalize_unit(raw) for raw in set(unit_raw)}
    units = [unit_cache[raw] for raw in unit_raw]
    value_missing = np.fromiter((f.value is None for f in fields), dtype=bool, count=n)
    values = np.fromiter(
        (VALUE_DEFAULT if f.value is None else f.value for f in fields), dtype=np.float64, count=n
    )
    quantity, kinds = canonical_quantities(values, units)
    unit_missing = np.fromiter((r is None for r in unit_raw), dtype=bool, count=n)
    item_names = [f.item_name for f in fields]
    texts = [f.text for f in fields]
    packs = np.fromiter((parse_pack(name) for name in item_names), dtype=np.int64, count=n)

    parsed = pd.DataFrame(
        {
            "item_name": item_names,
            "bullets": [list(f.bullets) for f in fields],
            "description": [f.description for f in fields],
            "value": values,
            "unit_raw": pd.Series(unit_raw, dtype=object),
            "unit": units,
            "pack": packs,
            "quantity": quantity,
            "quantity_kind": kinds,
            "log_quantity": np.log1p(np.clip(quantity, 0.0, None)),
            "n_bullets": np.fromiter((len(f.bullets) for f in fields), dtype=np.int64, count=n),
            "text_len": np.fromiter((len(t) for t in texts), dtype=np.int64, count=n),
            "text": texts,
            "value_missing": value_missing.astype(np.int8),
            "unit_missing": unit_missing.astype(np.int8),
        },
        index=df.index,
    )
    out = pd.concat(
        [df.drop(columns=[c for c in PARSED_COLUMNS if c in df.columns]), parsed], axis=1
    )

    counts = {
        "rows": n,
        "empty_text": _count(not isinstance(t, str) or not t.strip() for t in raw_texts),
        "item_name_missing": _count(not name for name in item_names),
        "value_missing": int(value_missing.sum()),
        "value_malformed": _count(
            _read_number(f.value_raw) is None and not _is_null_token(f.value_raw) for f in fields
        ),
        "value_out_of_range": _count(
            f.value is None and _read_number(f.value_raw) is not None for f in fields
        ),
        "unit_missing": int(unit_missing.sum()),
        "unit_none": _count(
            u == "none" and not m for u, m in zip(units, unit_missing, strict=True)
        ),
        "unit_unrecognised": _count(u == "other" for u in units),
        "no_bullets": _count(not f.bullets for f in fields),
        "no_description": _count(not f.description for f in fields),
        "pack_found": int((packs > 1).sum()),
    }
    return out, ParseReport(counts)


def format_catalog(
    item_name: str,
    bullets: Sequence[str] = (),
    description: str = "",
    value: float | None = None,
    unit: str | None = None,
) -> str:
    """The inverse of `parse_catalog`, in the competition's layout (used by the demo generator).

    None for value or unit leaves that line out, which is how malformed demo rows are made.
    """
    lines = [f"Item Name: {item_name}"]
    lines += [f"Bullet Point {i}: {b}" for i, b in enumerate(bullets, start=1)]
    if description:
        lines.append(f"Product Description: {description}")
    if value is not None:
        lines.append(f"Value: {float(round(value, 3))}")  # "72.0", "11.4", "nan" as in the data
    if unit is not None:
        lines.append(f"Unit: {unit}")
    return "\n".join(lines) + "\n"
