"""What a served request must be: the input columns and `validate_input`, which turns a
stranger's DataFrame into rows the model can price or refuses it naming rows and columns.

Kept apart from the pyfunc (pricefuse.serving.model) so the rules can be read, and tested with
arbitrary input (tests/unit/test_parse_properties.py), without loading a model.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd

INPUT_TEXT = "catalog_content"
INPUT_IMAGE_LINK = "image_link"
INPUT_IMAGE_B64 = "image_b64"
INPUT_ID = "sample_id"


class InvalidInputError(ValueError):
    """Input rows the model cannot price; the message names the rows and the problem."""


_SHOWN_ROWS = 10  # row indexes listed in an error message; the count says how many there are
_INT64 = np.iinfo(np.int64)
_ID_TEXT = re.compile(r"[-+]?[0-9]{1,19}")
_NULL_MARKERS = frozenset({"", "nan", "none", "null"})


def row_list(rows: list[int]) -> tuple[str, str]:
    """`3 row(s) ... (row index 0, 4, 9)`'s count and index part, for any error about rows."""
    shown = ", ".join(str(i) for i in rows[:_SHOWN_ROWS])
    more = ", ..." if len(rows) > _SHOWN_ROWS else ""
    return f"{len(rows)} row(s)", f"(row index {shown}{more})"


def _refuse(column: str, rows: list[int], problem: str) -> None:
    """Raise InvalidInputError for `rows` of `column` (when there are any)."""
    if rows:
        count, where = row_list(rows)
        raise InvalidInputError(f"{count} have {problem} {column!r} {where}")


def _blank_or_null_marker(text: str) -> bool:
    """Empty, whitespace, or a missing value turned into text. MLflow's `inputs`/`instances`
    request formats stringify every cell of a string column: JSON null arrives as "None" and NaN
    as "nan", which would otherwise be priced as a product called "None"."""
    return text.strip().lower() in _NULL_MARKERS


def _is_null(value: object) -> bool:
    """None, NaN or pandas' missing markers: how JSON null and absent CSV cells arrive."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float | np.floating) and bool(np.isnan(value))


def _as_id(value: object) -> int | None:
    """An int64 sample id from an int, an integral float (CSV columns with gaps are float) or a
    string of digits; None for anything else (bools, fractions, NaN, text, out of int64)."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        number = int(value)
    elif isinstance(value, float | np.floating):
        if not np.isfinite(value) or not float(value).is_integer():
            return None
        number = int(value)
    elif isinstance(value, str) and _ID_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        return None
    return number if _INT64.min <= number <= _INT64.max else None


def validate_input(frame: object, max_text_chars: int) -> pd.DataFrame:
    """Check the serving input and return a normalised copy, or raise InvalidInputError.

    The copy has a fresh 0..n-1 index, `catalog_content` as non-blank strings of at most
    `max_text_chars` characters, `image_link`/`image_b64` as a string or None (blank -> None),
    and `sample_id`, when given, as int64. Why refuse rather than repair: a row priced from a
    guess is a silent wrong answer; a 400 that names the row and the column is not. The text
    itself is never refused for what it says (only for being empty or a stringified null):
    parsing gives documented defaults (data.catalog).
    """
    if not isinstance(frame, pd.DataFrame):
        raise InvalidInputError(f"expected a DataFrame of product rows, got {type(frame).__name__}")
    if isinstance(frame.columns, pd.MultiIndex):
        raise InvalidInputError("expected flat column names, got nested (MultiIndex) columns")
    names = [str(c) for c in frame.columns]
    repeated = sorted(n for n, count in Counter(names).items() if count > 1)
    if repeated:
        raise InvalidInputError(f"column(s) {repeated} appear more than once")
    if INPUT_TEXT not in names:
        raise InvalidInputError(f"missing required column {INPUT_TEXT!r}; got columns {names}")
    if frame.empty:
        raise InvalidInputError("no rows to price")
    out = frame.reset_index(drop=True)
    out.columns = names
    text = out[INPUT_TEXT].tolist()
    _refuse(
        INPUT_TEXT,
        [i for i, v in enumerate(text) if not isinstance(v, str) or _blank_or_null_marker(v)],
        "an empty, null ('nan', 'None', 'null') or non-text",
    )
    _refuse(
        INPUT_TEXT,
        [i for i, v in enumerate(text) if len(v) > max_text_chars],
        f"more than {max_text_chars} characters (serving.max_text_chars) in",
    )
    out[INPUT_TEXT] = pd.Series(text, dtype=object)
    for column in (INPUT_IMAGE_LINK, INPUT_IMAGE_B64):
        values = out[column].tolist() if column in names else [None] * len(out)
        _refuse(
            column,
            [i for i, v in enumerate(values) if not _is_null(v) and not isinstance(v, str)],
            "a value that is neither text nor null in",
        )
        out[column] = pd.Series(
            [v if isinstance(v, str) and v.strip() else None for v in values], dtype=object
        )
    if INPUT_ID in names:
        ids = [_as_id(v) for v in out[INPUT_ID].tolist()]
        _refuse(INPUT_ID, [i for i, v in enumerate(ids) if v is None], "a non-integer")
        out[INPUT_ID] = np.array(ids, dtype=np.int64)
    return out
