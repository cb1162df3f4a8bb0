"""Property-based tests: no string breaks the parser or the features built from it, and no input
breaks the served model's validation with anything but a clear InvalidInputError.

Why properties: the served model takes text from strangers. The parsing defaults are documented
in pricefuse.data.catalog; these tests feed arbitrary text and catalog-like text with random
Value/Unit/Pack fields (extreme, negative, NaN, infinite, garbled) and check the documented
bounds, down to the float32 matrices the members read.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricefuse.data.catalog import PACK_MAX, VALUE_MAX, parse_catalog, parse_frame, parse_pack
from pricefuse.data.units import QUANTITY_KINDS
from pricefuse.features.ngrams import text_view
from pricefuse.features.tabular import parsed_features
from pricefuse.models.ensemble.blend import meta_features
from pricefuse.models.fusion.inputs import SplitData, numeric_matrix
from pricefuse.models.text.data import render_texts
from pricefuse.serving.inputs import (
    INPUT_ID,
    INPUT_IMAGE_B64,
    INPUT_IMAGE_LINK,
    INPUT_TEXT,
    InvalidInputError,
    validate_input,
)
from tests.support import project_params

FAST = settings(max_examples=150)
# Largest canonical quantity: VALUE_MAX of the unit with the largest factor (gallons in ml).
QUANTITY_MAX = VALUE_MAX * 3785.411784
MAX_TEXT_CHARS = project_params().serving.max_text_chars
TEMPLATE = project_params().text.template

# Any code point but surrogates (pandas' string columns cannot hold them; the parser's own
# surrogate handling has a unit test), control characters and line separators included.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
line_breaks = st.sampled_from(["\n", "\r\n", "\r", "\x0b", "\x1c", "\u2028", "\n\n  \n"])
numbers_as_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(min_value=-(10**420), max_value=10**420).map(str),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["12..5", "\u0661\u0662", "5e", "1e308", "1e-320", "-0", "+.5", "1,0,0", "."]),
)
value_text = st.one_of(
    numbers_as_text, any_text, st.builds("{} {}".format, numbers_as_text, any_text)
)
unit_text = st.one_of(
    st.sampled_from(["Ounce", "Fl. Oz", "gallon", "COUNT", "None", "sq ft", "", "furlong"]),
    any_text,
)
pack_phrase = st.builds(
    "{} {}".format,
    st.sampled_from(["Pack of", "Set of", "Case of", "", "x"]),
    st.one_of(numbers_as_text, st.integers(-(10**12), 10**12).map(str)),
)


@st.composite
def catalog_blobs(draw: st.DrawFn) -> str:
    """Text in the competition's layout, every field possibly extreme, garbled or missing."""
    lines = [f"Item Name: {draw(any_text)} {draw(pack_phrase)} {draw(numbers_as_text)}"]
    lines += [f"Bullet Point {i}: {draw(any_text)}" for i in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        lines.append(f"Product Description: {draw(any_text)}")
    if draw(st.booleans()):
        lines.append(f"Value: {draw(value_text)}")
    if draw(st.booleans()):
        lines.append(f"Unit: {draw(unit_text)}")
    order = draw(st.permutations(lines)) if draw(st.booleans()) else lines
    return draw(line_breaks).join(order)


blobs = st.one_of(any_text, catalog_blobs())


def finite_or_nan_float32(values: np.ndarray) -> bool:
    """True when no value overflows float32 (the members' dtype); NaN means missing."""
    return not np.isinf(np.asarray(values, dtype=np.float64).astype(np.float32)).any()


@FAST
@given(blobs)
def test_parse_catalog_never_raises_and_keeps_value_in_range(blob: str) -> None:
    fields = parse_catalog(blob)
    assert fields.value is None or (math.isfinite(fields.value) and 0 <= fields.value <= VALUE_MAX)
    assert 1 <= parse_pack(fields.item_name) <= PACK_MAX
    fields.text.encode("utf-8")  # tokenizers and JSON encoders take it


@FAST
@given(st.lists(st.one_of(blobs, st.none(), st.floats(), st.integers()), min_size=1, max_size=6))
def test_parsed_rows_give_bounded_finite_features_to_every_member(contents: list) -> None:
    raw = pd.DataFrame({"catalog_content": pd.Series(contents, dtype=object)})
    parsed, report = parse_frame(raw)
    assert report.rows == len(contents)
    assert parsed["value"].between(0, VALUE_MAX).all()
    assert parsed["quantity"].between(0, QUANTITY_MAX).all()
    assert parsed["pack"].between(1, PACK_MAX).all()
    assert set(parsed["quantity_kind"]) <= set(QUANTITY_KINDS)
    numeric = parsed[["value", "quantity", "log_quantity", "pack", "n_bullets", "text_len"]]
    assert np.isfinite(numeric.to_numpy(np.float32)).all()
    # what the boosters, the fusion head, the blend's meta-features and the text members read
    assert finite_or_nan_float32(parsed_features(parsed).to_numpy())
    n = len(parsed)
    split = SplitData(parsed, np.zeros((n, 4)), np.zeros((n, 3)), np.zeros(n, dtype=bool))
    assert finite_or_nan_float32(numeric_matrix(split))
    assert np.isfinite(meta_features(parsed, np.zeros(n, dtype=bool))).all()
    assert all(
        isinstance(t, str) for t in text_view(parsed, "name") + render_texts(parsed, TEMPLATE)
    )


# --- the served model's validation ------------------------------------------------------------

cell_values = st.one_of(
    st.none(),
    any_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["12", " 7 ", "1e3", "", "  ", "Item Name: tea\nValue: 1e308\n"]),
)
column_names = st.one_of(
    st.sampled_from([INPUT_TEXT, INPUT_IMAGE_LINK, INPUT_IMAGE_B64, INPUT_ID, "extra"]),
    st.integers(0, 3),
)


# Cells that pass validation, per column, so that accepted frames are common, not a fluke.
valid_cells = {
    INPUT_TEXT: st.one_of(catalog_blobs(), any_text.filter(lambda t: t.strip())),
    INPUT_ID: st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(0, 10**6).map(str)),
    INPUT_IMAGE_LINK: st.one_of(st.none(), any_text),
    INPUT_IMAGE_B64: st.one_of(st.none(), any_text),
}


@st.composite
def request_frames(draw: st.DrawFn) -> pd.DataFrame:
    """Frames as a request might decode to: usually catalog_content plus any other columns
    (repeats too), cells mostly valid for their column and sometimes of any type at all."""
    columns = [INPUT_TEXT] if draw(st.integers(0, 9)) else []
    columns += draw(
        st.lists(column_names.filter(lambda c: c not in columns), max_size=3, unique=True)
    )
    if columns and not draw(st.integers(0, 9)):
        columns.append(draw(st.sampled_from(columns)))  # a column given twice
    n = draw(st.integers(0, 4))

    def cell(column: object) -> object:
        valid = valid_cells.get(column)  # type: ignore[call-overload]
        return draw(cell_values if valid is None or not draw(st.integers(0, 14)) else valid)

    data = [[cell(column) for column in columns] for _ in range(n)]
    return pd.DataFrame(data, columns=columns, dtype=object) if columns else pd.DataFrame(data)


def check_normalised(out: pd.DataFrame, n_rows: int) -> None:
    """The contract validate_input promises when it accepts."""
    assert list(out.index) == list(range(n_rows))
    for text in out[INPUT_TEXT]:
        assert isinstance(text, str) and text.strip() and len(text) <= MAX_TEXT_CHARS
    for column in (INPUT_IMAGE_LINK, INPUT_IMAGE_B64):
        assert all(v is None or (isinstance(v, str) and v.strip()) for v in out[column])
    if INPUT_ID in out.columns:
        assert out[INPUT_ID].dtype == np.int64


@FAST
@given(request_frames())
def test_validate_input_accepts_or_names_the_problem(frame: pd.DataFrame) -> None:
    try:
        out = validate_input(frame, MAX_TEXT_CHARS)
    except InvalidInputError as exc:
        assert str(exc).strip()
        return
    check_normalised(out, len(frame))
    parse_frame(out)  # what the model does next


@settings(max_examples=30)
@given(cell_values)
def test_validate_input_names_what_it_got_instead_of_a_frame(value: object) -> None:
    with pytest.raises(InvalidInputError, match=f"got {type(value).__name__}"):
        validate_input(value, MAX_TEXT_CHARS)


@pytest.mark.parametrize("sample_id", ["abc", 1.5, None, True, 2**64, "1e3", [1]])
def test_a_non_integer_sample_id_is_named(sample_id: object) -> None:
    frame = pd.DataFrame(
        {INPUT_TEXT: ["Item Name: a", "Item Name: b"], INPUT_ID: [7, sample_id]}, dtype=object
    )
    with pytest.raises(InvalidInputError, match=r"1 row\(s\) have a non-integer 'sample_id'.*1\)"):
        validate_input(frame, MAX_TEXT_CHARS)


def test_integral_sample_ids_are_normalised_to_int64() -> None:
    frame = pd.DataFrame({INPUT_TEXT: ["a", "b", "c"], INPUT_ID: [7, 8.0, " 9 "]}, dtype=object)
    out = validate_input(frame, MAX_TEXT_CHARS)
    assert out[INPUT_ID].tolist() == [7, 8, 9] and out[INPUT_ID].dtype == np.int64
