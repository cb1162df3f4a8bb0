"""Text cleaning options for the parsed catalog fields (SPAM_LLMs' preprocessing), as params.

Three options, each a `preprocess` param; only `numbers_as_words` is on by default, the one
that measured better on the real rows (docs/results.md, from `benchmarks/text_cleaning.py`
and an A/B of the whole pipeline). The boosters' name features (pricefuse.features.tabular: how
many numbers the name holds, the largest, its length, keywords) read the name as written
(column NAME_AS_WRITTEN, added when an option is on), so the options change what the text
readers see and never those features:

- `remove_emoji`: pictographs, dingbats, flags, keycaps, skin tones, variation selectors and
  the zero-width joiners that glue them into one glyph are dropped. A regex over the Unicode
  blocks (stdlib `re`), not the `emoji` package: the served model then needs no extra
  dependency, and the blocks cover Unicode's Extended_Pictographic property (a unit test checks
  this against the `regex` module's property tables) except ©, ®, ™, ℹ and the plain arrows
  ↔ ↕ ↖ ↗ ↘ ↙ ↩ ↪: in product text they are brand marks and dimensions, not decoration.
- `numbers_as_words`: "12 oz" -> "twelve oz", "2.5" -> "two point five", "1,000" -> "one
  thousand". A small pure function rather than `num2words`: English cardinals are a few lines,
  and the served model again needs nothing new. Digits glued to a preceding letter ("X100",
  "B07XJ8C8F5") and runs that read as codes (a leading zero, more than 15 digits) stay as they
  are: they name a model, not a quantity.
- `text_body`: what the text keeps besides the item name: `all` (every bullet and the
  description, today's text), `description` (the description; the first five bullets when a row
  has none) or `bullets5` (the first five bullets; the description when a row has none).

The options rewrite the word columns every text reader takes — `item_name`, `bullets`,
`description` and `text` (layout.TEXT: the embedder, the `text` view of the linear member and
the neighbours, the text member's templates). The numbers (`value`, `unit`, `pack`,
`quantity`) and the listing's shape (`n_bullets`, `text_len`) are parsed from the raw text first
and stay as written. `parse_products` is the one entry point for both preprocess and the served
model, so serving cleans a request exactly as training cleaned the rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pricefuse.core.config import PreprocessConfig
from pricefuse.core.layout import NAME_AS_WRITTEN
from pricefuse.data.catalog import CatalogFields, ParseReport, parse_frame

TEXT_BODIES = ("all", "description", "bullets5")
BULLETS_KEPT = 5  # SPAM_LLMs kept the first five bullet points
TEXT_COLUMNS = ("item_name", "bullets", "description", "text")

# Pictographic code points by block: Extended_Pictographic and more, less the marks kept above.
_PICTOGRAPHS = (
    "\u203c\u2049"  # double exclamation / exclamation question marks
    "\u231a\u231b\u2328\u23cf\u23e9-\u23f3\u23f8-\u23fa"  # watch, hourglass, media controls
    "\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe"  # circled M, squares, play buttons
    "\u2600-\u27bf"  # Miscellaneous Symbols, Dingbats
    "\u2934\u2935\u2b00-\u2bff"  # curved arrows, Miscellaneous Symbols and Arrows
    "\u3030\u303d\u3297\u3299"  # wavy dash, part alternation mark, circled ideographs
    "\U0001f000-\U0001faff"  # mahjong .. Symbols and Pictographs Extended-A (flags, skin tones)
    "\U0001fc00-\U0001fffd"  # reserved for future pictographs
)
# Marks that only mean something next to a pictograph: text/emoji variation selectors, the
# combining keycap (its base digit is kept: "1️⃣ Step" -> "1 Step"), tag characters (subdivision
# flags).
_EMOJI_MARKS = "\ufe0e\ufe0f\u20e3\U000e0020-\U000e007f"
# A pictograph with its marks, joined by ZWJ to further ones (one family glyph); a run of them
# with the spaces around it becomes one space ("a 🔥 🔥 b" -> "a b", "tea🔥pack" -> "tea pack").
_GLYPH = rf"[{_PICTOGRAPHS}][{_EMOJI_MARKS}]*(?:\u200d[{_PICTOGRAPHS}][{_EMOJI_MARKS}]*)*"
_EMOJI_RUN = re.compile(rf"(?:[ \t]*{_GLYPH})+[ \t]*")
_STRAY_MARKS = re.compile(rf"[{_EMOJI_MARKS}]")

_ONES = (
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    *("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen"),
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))
MAX_WORDED_DIGITS = 15  # below 10**15: trillions; longer digit runs are codes
# An integer (plain, or with comma thousands) and an optional decimal part, not glued to a
# preceding letter, digit, "_" or ".", nor directly followed by another digit.
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(\d+))?(?!\d)")


def remove_emoji(text: str) -> str:
    """`text` without emoji (see the module docstring); text without any is returned as is."""
    cleaned = _STRAY_MARKS.sub("", _EMOJI_RUN.sub(" ", text))
    return text if cleaned == text else cleaned.strip()


def _below_thousand(n: int) -> list[str]:
    words = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(_ONES[n])
    return words


def integer_words(n: int) -> str:
    """English cardinal of 0 <= n < 10**15: 1205 -> "one thousand two hundred five"."""
    if not 0 <= n < 10**MAX_WORDED_DIGITS:
        raise ValueError(f"integer_words takes 0 <= n < 10**{MAX_WORDED_DIGITS}, got {n}")
    words: list[str] = []
    for scale, name in _SCALES:
        if n >= scale:
            words += [*_below_thousand(n // scale), name]
            n %= scale
    if n or not words:
        words += _below_thousand(n)
    return " ".join(words)


def _number_words(match: re.Match[str]) -> str:
    integer, decimals = match.group(1).replace(",", ""), match.group(2)
    if (len(integer) > 1 and integer.startswith("0")) or len(integer) > MAX_WORDED_DIGITS:
        return match.group(0)  # a code ("007", a barcode), not a quantity
    words = integer_words(int(integer))
    if decimals:
        words += " point " + " ".join(_ONES[int(d)] for d in decimals)
    following = match.string[match.end() : match.end() + 1]
    return words + " " if following.isalpha() else words  # "12oz" -> "twelve oz"


def numbers_to_words(text: str) -> str:
    """Numbers written out: "Pack of 12, 2.5 oz" -> "Pack of twelve, two point five oz"."""
    return _NUMBER.sub(_number_words, text)


def check_text_body(body: str) -> None:
    """Fail with the known choices on a typo, before any row is parsed."""
    if body not in TEXT_BODIES:
        raise ValueError(
            f"preprocess.text_body must be one of {', '.join(TEXT_BODIES)}, got {body!r}"
        )


def select_body(bullets: Sequence[str], description: str, body: str) -> tuple[tuple[str, ...], str]:
    """(bullets, description) the text keeps under `text_body` (see the module docstring)."""
    check_text_body(body)
    bullets = tuple(bullets)
    if body == "description":
        return ((), description) if description else (bullets[:BULLETS_KEPT], "")
    if body == "bullets5":
        return (bullets[:BULLETS_KEPT], "") if bullets else ((), description)
    return bullets, description


# The text options' values that leave the parsed text as written (cleaning_enabled is False).
TEXT_OPTIONS_OFF: dict[str, object] = {
    "remove_emoji": False,
    "numbers_as_words": False,
    "text_body": "all",
}


def cleaning_enabled(cfg: PreprocessConfig) -> bool:
    """Whether any option changes text (all off: parsed tables are exactly parse_frame's)."""
    check_text_body(cfg.text_body)
    return cfg.remove_emoji or cfg.numbers_as_words or cfg.text_body != "all"


def clean_text(text: str, cfg: PreprocessConfig) -> str:
    """One field through the enabled string options (emoji first: "1️⃣" leaves a digit)."""
    if cfg.remove_emoji:
        text = remove_emoji(text)
    if cfg.numbers_as_words:
        text = numbers_to_words(text)
    return text


def clean_parsed(parsed: pd.DataFrame, cfg: PreprocessConfig) -> pd.DataFrame:
    """`parsed` (parse_frame's output) with the word columns cleaned and `text` rebuilt from them
    as `CatalogFields.text` builds it; every other column untouched. All options off: `parsed`
    itself."""
    if not cleaning_enabled(cfg):
        return parsed
    fields = []
    for name, bullets, description in zip(
        parsed["item_name"], parsed["bullets"], parsed["description"], strict=True
    ):
        kept, description = select_body(list(bullets), description, cfg.text_body)
        cleaned = (clean_text(b, cfg) for b in kept)
        fields.append(
            CatalogFields(
                item_name=clean_text(name, cfg),
                bullets=tuple(b for b in cleaned if b),
                description=clean_text(description, cfg),
            )
        )
    out = parsed.copy()
    out[NAME_AS_WRITTEN] = parsed["item_name"]  # the boosters' name features read digits
    out["item_name"] = [f.item_name for f in fields]
    out["bullets"] = [list(f.bullets) for f in fields]
    out["description"] = [f.description for f in fields]
    out["text"] = [f.text for f in fields]
    return out


def parse_products(frame: pd.DataFrame, cfg: PreprocessConfig) -> tuple[pd.DataFrame, ParseReport]:
    """parse_frame, then the text options of `cfg`: how the served model reads a request, and
    what preprocess writes (preprocess assigns its folds between the two steps, on the text as
    written, so every cleaning option shares one set of folds)."""
    parsed, report = parse_frame(frame)
    return clean_parsed(parsed, cfg), report


def changed_rows(before: pd.DataFrame, after: pd.DataFrame) -> int:
    """Rows whose encoder text the options changed (a preprocess metric)."""
    return int(np.sum(before["text"].to_numpy() != after["text"].to_numpy()))
