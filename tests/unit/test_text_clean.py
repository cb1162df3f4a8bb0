import dataclasses

import pandas as pd
import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from pricefuse.data.catalog import format_catalog, parse_frame
from pricefuse.data.text_clean import (
    TEXT_OPTIONS_OFF,
    clean_parsed,
    integer_words,
    numbers_to_words,
    parse_products,
    remove_emoji,
    select_body,
)
from tests.support import project_params

OFF = dataclasses.replace(project_params().preprocess, **TEXT_OPTIONS_OFF)
BULLETS = [f"bullet {c}" for c in "abcdefg"]


def _cfg(**options):
    return dataclasses.replace(OFF, **options)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Great 🔥 tea", "Great tea"),
        ("tea🔥pack", "tea pack"),
        ("a 🔥 🔥 b", "a b"),
        ("Family 👨‍👩‍👧 set", "Family set"),  # one ZWJ sequence
        ("🇺🇸 Made", "Made"),  # flag: regional indicators
        ("Love ❤️ it", "Love it"),  # dingbat + variation selector
        ("👍🏽 Nice", "Nice"),  # skin tone modifier
        ("1️⃣ Step", "1 Step"),  # keycap: the digit stays
        ("Star ★ rated ✔", "Star rated"),
    ],
)
def test_remove_emoji(text: str, expected: str) -> None:
    assert remove_emoji(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Acme Trail Mix, Salted, 8 Ounce (Pack of 3)",
        "Brand™ Cream® © 2024 ↔ 30 cm, 50% off!",
        "Grüner Tee – 茶 100g",
        "क्‍ष",  # a ZWJ inside Devanagari is part of the script, not an emoji sequence
        "two  spaces kept",
    ],
)
def test_remove_emoji_keeps_plain_text(text: str) -> None:
    assert remove_emoji(text) == text


def test_every_extended_pictographic_is_removed_but_the_kept_marks() -> None:
    """The block ranges against Unicode's own property (the `regex` module's tables)."""
    kept = {0xA9, 0xAE, 0x2122, 0x2139, *range(0x2194, 0x219A), 0x21A9, 0x21AA}
    universe = "".join(chr(c) for c in range(0xA0, 0x20000) if not 0xD800 <= c < 0xE000)
    pictographs = regex.findall(r"\p{Extended_Pictographic}", universe)
    assert len(pictographs) > 2500  # the property is found at all
    left = [hex(ord(c)) for c in pictographs if remove_emoji(f"a {c} b") != "a b"]
    assert sorted(left) == sorted(hex(c) for c in kept)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12 oz", "twelve oz"),
        ("12oz", "twelve oz"),
        ("Pack of 12, 2.5 oz", "Pack of twelve, two point five oz"),
        ("0.75 L", "zero point seven five L"),
        ("1,000 ct", "one thousand ct"),
        ("21 count", "twenty-one count"),
        ("100", "one hundred"),
        ("1205 g", "one thousand two hundred five g"),
        ("3000000 mAh", "three million mAh"),
        ("$12.99.", "$twelve point nine nine."),
        # codes stay: glued to a letter, a leading zero, more than 15 digits
        ("Model X100 B07XJ8C8F5", "Model X100 B07XJ8C8F5"),
        ("code 007", "code 007"),
        ("UPC 1234567890123456", "UPC 1234567890123456"),
    ],
)
def test_numbers_to_words(text: str, expected: str) -> None:
    assert numbers_to_words(text) == expected


def test_integer_words_scales() -> None:
    assert integer_words(0) == "zero"
    assert integer_words(90) == "ninety"
    assert integer_words(1_000_001) == "one million one"
    assert integer_words(10**15 - 1).startswith("nine hundred ninety-nine trillion")
    with pytest.raises(ValueError, match="10\\*\\*15"):
        integer_words(10**15)


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd", "Cs"))))
def test_text_without_digits_is_unchanged(text: str) -> None:
    assert numbers_to_words(text) == text


def test_select_body() -> None:
    assert select_body(BULLETS, "desc", "all") == (tuple(BULLETS), "desc")
    assert select_body(BULLETS, "desc", "bullets5") == (tuple(BULLETS[:5]), "")
    assert select_body([], "desc", "bullets5") == ((), "desc")  # no bullets: the description
    assert select_body(BULLETS, "desc", "description") == ((), "desc")
    assert select_body(BULLETS, "", "description") == (tuple(BULLETS[:5]), "")
    with pytest.raises(ValueError, match="all, description, bullets5"):
        select_body(BULLETS, "desc", "bullets")


def _rows() -> pd.DataFrame:
    texts = [
        format_catalog("Tea 🔥 12 oz (Pack of 3)", BULLETS, "Fresh 🍵 leaves", 12.0, "Ounce"),
        format_catalog("Plain soap", (), "2 bars", 2.0, "Count"),
    ]
    return pd.DataFrame({"catalog_content": texts})


def test_all_options_off_is_parse_frame_exactly() -> None:
    parsed, _ = parse_frame(_rows())
    assert clean_parsed(parsed, OFF) is parsed
    served, _ = parse_products(_rows(), OFF)
    pd.testing.assert_frame_equal(served, parsed)


def test_options_clean_the_word_columns_only() -> None:
    raw, _ = parse_frame(_rows())
    cfg = _cfg(remove_emoji=True, numbers_as_words=True, text_body="bullets5")
    cleaned, _ = parse_products(_rows(), cfg)
    assert cleaned["item_name"].tolist() == ["Tea twelve oz (Pack of three)", "Plain soap"]
    assert cleaned["bullets"].tolist() == [BULLETS[:5], []]
    assert cleaned["description"].tolist() == ["", "two bars"]  # soap has no bullets
    assert cleaned["text"].tolist() == [
        "\n".join(["Tea twelve oz (Pack of three)", *BULLETS[:5]]),
        "Plain soap\ntwo bars",
    ]
    numbers = ["value", "unit", "pack", "quantity", "n_bullets", "text_len", "value_missing"]
    pd.testing.assert_frame_equal(cleaned[numbers], raw[numbers])  # parsed before cleaning
    assert cleaned["pack"].tolist() == [3, 1]


def test_the_boosters_name_features_read_the_name_as_written() -> None:
    from pricefuse.features.tabular import parsed_features

    raw, _ = parse_frame(_rows())
    cfg = _cfg(remove_emoji=True, numbers_as_words=True, text_body="bullets5")
    cleaned, _ = parse_products(_rows(), cfg)
    assert cleaned["item_name"][0] != raw["item_name"][0]  # the digits became words ...
    before, after = parsed_features(raw), parsed_features(cleaned)
    assert before["name_n_numbers"][0] == 2  # ... but "12 oz (Pack of 3)" still has 2 numbers
    pd.testing.assert_frame_equal(after, before)


class _Encoded(Exception):
    """Raised by the stand-in text encoder with the texts the served model handed it."""


class _TextsOnly:
    def encode(self, texts) -> None:
        raise _Encoded(list(texts))


def test_served_model_cleans_a_request_with_its_params_snapshot() -> None:
    from pricefuse.serving.model import PriceEnsembleModel

    options = {"remove_emoji": True, "numbers_as_words": True, "text_body": "bullets5"}
    model = PriceEnsembleModel()
    model.params = project_params(preprocess=options)
    model.text_encoder = _TextsOnly()  # stops the request at the encoder, texts in hand
    with pytest.raises(_Encoded) as encoded:
        model.predict_prices(_rows(), [None, None], level=0.8)
    expected, _ = parse_products(_rows(), _cfg(**options))
    assert encoded.value.args[0] == expected["text"].tolist()
    assert encoded.value.args[0][0].startswith("Tea twelve oz (Pack of three)\nbullet a")
