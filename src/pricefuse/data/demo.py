"""Synthetic demo data in the competition's exact format, generated locally and deterministically.

Why: the pipeline must run end to end (DVC, MLflow, serving) on a fresh clone with no download,
and tests need data whose answer is known. Prices follow a hidden rule a model can learn from
both modalities:

    price = category base x (quantity / reference)^elasticity x pack^0.9 x brand tier
            x deluxe badge x lognormal noise

The text carries category, brand, size, unit and pack (in the competition's messy spellings);
the rendered image carries category (background, shape), size (shape scale), pack (tokens), the
premium tier (a gold border) and a "deluxe" badge that the text never mentions, so an image
encoder has something of its own to add. Real-data quirks are reproduced on purpose: many unit
spellings, "Pack of N" in names with Value sometimes the pack total, optional bullets and
descriptions, rows without Value or Unit, relisted duplicates at other prices, and missing,
broken and corrupt images.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pricefuse.core.config import DemoConfig
from pricefuse.data.catalog import format_catalog

IMAGE_PREFIX = "img_"
RELIST_RATE_TRAIN = 0.06  # train rows that relist an earlier train product at a new price
RELIST_RATE_TEST = 0.03  # test rows that relist a train product (what KNN correction exploits)
NO_VALUE_RATE = 0.01  # rows without a Value line
NO_UNIT_RATE = 0.01  # rows without a Unit line
UNIT_NONE_RATE = 0.015  # rows with "Value: nan" / "Unit: None", as in the real catalog
NOISE_SIGMA = 0.12
PACK_ELASTICITY = 0.9
DELUXE_RATE = 0.2
DELUXE_FACTOR = 1.35
TIERS = {"premium": 1.8, "standard": 1.0, "value": 0.7}
GOLD = (212, 175, 55)

# Unit spellings per family, weighted roughly as in the real catalog.
_SPELLINGS: dict[str, tuple[tuple[str, int], ...]] = {
    "ounce": (("Ounce", 60), ("ounce", 8), ("oz", 6), ("Oz", 2), ("OZ", 1), ("Ounces", 1)),
    "fl_oz": (
        ("Fl Oz", 40),
        ("fl oz", 3),
        ("Fl. Oz", 2),
        ("Fluid Ounce", 2),
        ("FL OZ", 1),
        ("Fl oz", 1),
    ),
    "count": (("Count", 40), ("count", 4), ("ct", 2), ("COUNT", 1), ("each", 1), ("Each", 1)),
    "pound": (("pound", 4), ("Pound", 3), ("lb", 2), ("lbs", 1)),
    "gram": (("gram", 3), ("Gram", 2), ("grams", 1), ("g", 1)),
    "millilitre": (("millilitre", 2), ("milliliter", 2), ("ml", 1)),
}
# How the size is written in the item name, per family.
_NAME_UNITS = {
    "ounce": ("Ounce", "oz", "Oz"),
    "fl_oz": ("Fl Oz", "fl oz", "Fluid Ounce"),
    "count": ("Count", "ct", "Count"),
    "pound": ("Pound", "lb", "lbs"),
    "gram": ("g", "Gram", "grams"),
    "millilitre": ("ml", "mL", "Milliliter"),
}
_TO_CANONICAL = {
    "ounce": 28.349523125,
    "fl_oz": 29.5735295625,
    "count": 1.0,
    "pound": 453.59237,
    "gram": 1.0,
    "millilitre": 1.0,
}
_METRIC = {"ounce": "gram", "fl_oz": "millilitre"}


@dataclass(frozen=True)
class _Category:
    name: str
    nouns: tuple[str, ...]
    variants: tuple[str, ...]
    family: str  # unit family of the size
    sizes: tuple[float, ...]
    base_price: float  # one item at the reference quantity, standard tier
    reference: float  # canonical quantity (g, ml or items)
    elasticity: float  # price ~ quantity^elasticity: bigger sizes are cheaper per unit
    background: tuple[int, int, int]
    shape: str
    bullets: tuple[str, ...]


_CATEGORIES = (
    _Category(
        "coffee",
        ("Ground Coffee", "Whole Bean Coffee", "Espresso Roast"),
        ("Medium Roast", "Dark Roast", "Breakfast Blend", "Colombian", "Decaf"),
        "ounce",
        (10, 12, 16, 24, 32),
        9.0,
        340.0,
        0.75,
        (222, 203, 178),
        "bag",
        ("Roasted in small batches for a smooth, balanced cup", "100% Arabica beans"),
    ),
    _Category(
        "tea",
        ("Green Tea", "Herbal Tea", "Black Tea", "Chai Tea"),
        ("Peppermint", "Jasmine", "Earl Grey", "Chamomile", "Ginger Lemon"),
        "count",
        (16, 20, 40, 50, 100),
        5.0,
        20.0,
        0.6,
        (200, 230, 190),
        "box",
        ("Individually wrapped tea bags", "Naturally caffeine-free options"),
    ),
    _Category(
        "oil",
        ("Extra Virgin Olive Oil", "Avocado Oil", "Sesame Oil"),
        ("Cold Pressed", "Organic", "Mediterranean", "Unfiltered"),
        "fl_oz",
        (8.5, 16.9, 25.5, 33.8, 50.7),
        12.0,
        500.0,
        0.8,
        (246, 236, 170),
        "bottle",
        ("First cold pressed for rich flavour", "Great for dressings and sauteing"),
    ),
    _Category(
        "sauce",
        ("Hot Sauce", "Taco Sauce", "BBQ Sauce", "Pasta Sauce"),
        ("Mild", "Extra Hot", "Smoky Chipotle", "Garlic", "Original"),
        "fl_oz",
        (5, 8, 12, 18, 24),
        4.0,
        355.0,
        0.6,
        (240, 190, 180),
        "bottle",
        ("Made with vine-ripened peppers", "No artificial preservatives"),
    ),
    _Category(
        "snacks",
        ("Potato Chips", "Pretzels", "Trail Mix", "Tortilla Chips"),
        ("Sea Salt", "Honey Mustard", "Sweet & Salty", "Ranch", "Jalapeno"),
        "ounce",
        (1, 1.5, 5, 8, 10, 16),
        3.5,
        227.0,
        0.7,
        (250, 210, 150),
        "bag",
        ("Kettle cooked for extra crunch", "Perfect for lunch boxes and parties"),
    ),
    _Category(
        "spices",
        ("Ground Cinnamon", "Smoked Paprika", "Sea Salt", "Garlic Powder"),
        ("Organic", "Fine Ground", "Coarse", "Premium Grade"),
        "ounce",
        (1.5, 2.5, 4, 8, 16),
        5.0,
        70.0,
        0.5,
        (235, 222, 200),
        "jar",
        ("Non-GMO and gluten free", "Packed in a resealable shaker jar"),
    ),
    _Category(
        "vitamins",
        ("Vitamin D3 Softgels", "Daily Multivitamin", "Omega-3 Fish Oil", "Magnesium Capsules"),
        ("Extra Strength", "Adult", "Gummies", "High Potency"),
        "count",
        (30, 60, 90, 120, 180, 240),
        12.0,
        60.0,
        0.7,
        (210, 225, 245),
        "jar",
        ("Third-party tested for purity", "Supports immune health"),
    ),
    _Category(
        "pet",
        ("Dry Dog Food", "Cat Food", "Dog Treats"),
        ("Chicken & Rice", "Salmon", "Grain Free", "Lamb"),
        "pound",
        (3, 5, 15, 30),
        15.0,
        2268.0,
        0.8,
        (225, 210, 240),
        "bag",
        ("Real meat is the first ingredient", "No corn, wheat or soy"),
    ),
    _Category(
        "candy",
        ("Gummy Bears", "Dark Chocolate Bar", "Sour Candy", "Caramels"),
        ("Assorted", "Sugar Free", "Fruit", "Sea Salt"),
        "ounce",
        (1.5, 3.5, 5, 12, 32),
        3.0,
        100.0,
        0.7,
        (250, 200, 225),
        "box",
        ("Made with real fruit juice", "Individually wrapped"),
    ),
    _Category(
        "drinks",
        ("Sparkling Water", "Coconut Water", "Cold Brew Coffee", "Sports Drink"),
        ("Lime", "Unsweetened", "Berry", "Original"),
        "fl_oz",
        (8.4, 11.1, 12, 16.9, 33.8),
        1.5,
        355.0,
        0.8,
        (190, 225, 235),
        "can",
        ("Zero calories and zero sugar", "Recyclable packaging"),
    ),
)
_GENERIC_BULLETS = (
    "Satisfaction guaranteed or your money back",
    "Ships in protective packaging",
    "Kosher certified",
    "Family owned since 1952",
    "Store in a cool, dry place",
    "Made in the USA",
    "Great gift for friends and family",
)
_BRAND_WORDS = (
    ("Golden", "Nordic", "Blue", "Happy", "Wild", "Sunny", "Royal", "Green", "Urban", "Old"),
    ("Harvest", "Pantry", "Mesa", "Valley", "Grove", "Orchard", "Creek", "Kitchen", "Farm", "Mill"),
)
_PACKS = ((1, 0.55), (2, 0.1), (3, 0.08), (4, 0.07), (6, 0.1), (8, 0.03), (12, 0.05), (24, 0.02))
_PALETTE = (
    (180, 40, 40),
    (40, 90, 170),
    (30, 130, 70),
    (120, 60, 140),
    (200, 110, 30),
    (60, 60, 60),
    (20, 140, 150),
    (150, 120, 40),
)


@dataclass(frozen=True)
class _Product:
    """One generated listing; relisted duplicates share everything but sample id and noise."""

    category: int
    catalog_content: str
    image_name: str
    price_rule: float  # the hidden rule's price before noise
    shape: str
    background: tuple[int, int, int]
    colour: tuple[int, int, int]
    scale: float  # 0..1: size rank within the category
    pack: int
    premium: bool
    deluxe: bool
    # The parts of catalog_content, so `long_text` can rebuild it with more words.
    item_name: str = ""
    bullets: tuple[str, ...] = ()
    description: str = ""
    value: float | None = None
    unit: str | None = None


def _brands(rng: np.random.Generator) -> list[tuple[str, str]]:
    """Thirty brand names, each with a fixed tier (premium brands earn the gold border)."""
    names = [f"{a} {b}" for a in _BRAND_WORDS[0] for b in _BRAND_WORDS[1]]
    chosen = [names[i] for i in rng.choice(len(names), size=30, replace=False)]
    tiers = rng.choice(list(TIERS), size=30, p=[0.25, 0.5, 0.25])
    return list(zip(chosen, (str(t) for t in tiers), strict=True))


def _pick(rng: np.random.Generator, options: tuple) -> object:
    return options[int(rng.integers(len(options)))]


def _weighted(rng: np.random.Generator, options: tuple[tuple[object, float], ...]) -> object:
    weights = np.array([w for _, w in options], dtype=float)
    return options[int(rng.choice(len(options), p=weights / weights.sum()))][0]


def _fmt(number: float) -> str:
    """Sizes as people write them: "12", "1.5", "16.9"."""
    return f"{number:g}"


def _pack_phrase(rng: np.random.Generator, pack: int, size_text: str) -> tuple[str, str]:
    """(size part of the name, pack suffix) in one of the real catalog's pack styles."""
    if pack == 1:
        return size_text, " (Pack of 1)" if rng.random() < 0.1 else ""
    style = _weighted(
        rng, (("paren", 0.6), ("dash", 0.15), ("space", 0.1), ("set", 0.05), ("times", 0.1))
    )
    if style == "times":
        return f"{pack} x {size_text}", ""
    suffix = {
        "paren": f" (Pack of {pack})",
        "dash": f", {pack}-Pack",
        "space": f" - {pack} Pack",
        "set": f", Set of {pack}",
    }[str(style)]
    return size_text, suffix


def _new_product(rng: np.random.Generator, index: int, brands: list[tuple[str, str]]) -> _Product:
    """A fresh listing: text in the competition's format plus what the image will show."""
    cat_id = int(rng.integers(len(_CATEGORIES)))
    cat = _CATEGORIES[cat_id]
    brand, tier = brands[int(rng.integers(len(brands)))]
    noun = str(_pick(rng, cat.nouns))
    variant = str(_pick(rng, cat.variants))
    size_index = int(rng.integers(len(cat.sizes)))
    size = float(cat.sizes[size_index])
    family = cat.family
    if family in _METRIC and rng.random() < 0.12:  # some listings are metric
        size = round(size * _TO_CANONICAL[family])
        family = _METRIC[family]
    pack = int(_weighted(rng, _PACKS))
    deluxe = bool(rng.random() < DELUXE_RATE)
    quantity = size * _TO_CANONICAL[family]
    price_rule = (
        cat.base_price
        * (quantity / cat.reference) ** cat.elasticity
        * pack**PACK_ELASTICITY
        * TIERS[tier]
        * (DELUXE_FACTOR if deluxe else 1.0)
    )

    size_text = f"{_fmt(size)} {_pick(rng, _NAME_UNITS[family])}"
    size_part, pack_suffix = _pack_phrase(rng, pack, size_text)
    item_name = f"{brand} {noun}, {variant}, {size_part}{pack_suffix}"
    n_bullets = 0 if rng.random() < 0.2 else int(rng.integers(2, 6))
    pool = (*cat.bullets, *_GENERIC_BULLETS)
    order = rng.permutation(len(pool))[:n_bullets]
    bullets = [pool[i] for i in order]
    if tier == "premium" and n_bullets and rng.random() < 0.5:
        bullets[0] = f"Premium {noun.lower()} from {brand}"
    description = ""
    if rng.random() < 0.4:
        description = (
            f"{brand} {noun} ({variant}) brings you {_fmt(size)} "
            f"{_NAME_UNITS[family][0].lower()} of quality in every package."
        )
    value: float | None = round(size * pack if pack > 1 and rng.random() < 0.75 else size, 3)
    unit: str | None = str(_weighted(rng, _SPELLINGS[family]))
    draw = rng.random()
    if draw < NO_VALUE_RATE:
        value = None
    elif draw < NO_VALUE_RATE + NO_UNIT_RATE:
        unit = None
    elif draw < NO_VALUE_RATE + NO_UNIT_RATE + UNIT_NONE_RATE:
        value, unit = float("nan"), "None"
    text = format_catalog(item_name, bullets, description, value, unit)
    return _Product(
        category=cat_id,
        catalog_content=text,
        image_name=f"{IMAGE_PREFIX}{index:05d}.jpg",
        price_rule=price_rule,
        shape=cat.shape,
        background=cat.background,
        colour=_PALETTE[int(rng.integers(len(_PALETTE)))],
        scale=size_index / max(len(cat.sizes) - 1, 1),
        pack=pack,
        premium=tier == "premium",
        deluxe=deluxe,
        item_name=item_name,
        bullets=tuple(bullets),
        description=description,
        value=value,
        unit=unit,
    )


# `long_text`: real catalog texts run to a median of ~630 characters over a vocabulary of
# ~250k terms; the short demo texts reuse a few hundred words. Long texts add words drawn from
# a Zipf law over a pseudo-vocabulary, so TF-IDF vocabularies and text lengths (and with them
# the cost of the n-gram member, the neighbour search and the text encoder) are real-like.
LONG_VOCABULARY = 40_000
SHORT_LISTING_RATE = 0.25
_SYLLABLES = (
    "ba", "ko", "ri", "ten", "mar", "lo", "vi", "sa", "nu", "pel", "dor", "ki", "ra", "mo",
    "ste", "li", "gan", "fo", "zu", "che", "ta", "ne", "pro", "var", "sol", "mi", "tra", "den",
)  # fmt: skip


def _vocabulary(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(words, cumulative Zipf probabilities): LONG_VOCABULARY pseudo-words of 2-4 syllables."""
    words: dict[str, None] = {}
    while len(words) < LONG_VOCABULARY:
        n = int(rng.integers(2, 5))
        words["".join(_SYLLABLES[i] for i in rng.integers(len(_SYLLABLES), size=n))] = None
    weights = 1.0 / np.arange(1, LONG_VOCABULARY + 1) ** 1.05
    return np.array(list(words)), np.cumsum(weights / weights.sum())


def _phrase(rng: np.random.Generator, vocab: tuple[np.ndarray, np.ndarray], n: int) -> str:
    words, cumulative = vocab
    picks = np.minimum(np.searchsorted(cumulative, rng.random(n)), len(words) - 1)
    return " ".join(words[picks]).capitalize()


def _lengthen(product: _Product, rng: np.random.Generator, vocab: tuple) -> _Product:
    """The product with up to 6 bullets and a description of Zipf words appended, or (a quarter
    of them) with neither; price, image and every parsed field unchanged. Calibrated on the real
    rows with the default text encoder's tokenizer: characters at the quartiles ~345 / 650 /
    1,000 (real: 248 / 632 / 1,253), tokens per row within the 128-token window 102 on average
    (real: 98), so the encoder's cost per row is real-like."""
    if rng.random() < SHORT_LISTING_RATE:  # name, value and unit only, as many real rows are
        text = format_catalog(product.item_name, [], "", product.value, product.unit)
        return replace(product, catalog_content=text, bullets=(), description="")
    extra = int(rng.integers(0, 6)) - len(product.bullets)
    bullets = [
        f"{b}, {_phrase(rng, vocab, int(rng.integers(2, 8))).lower()}" for b in product.bullets
    ]
    bullets += [_phrase(rng, vocab, int(rng.integers(4, 12))) for _ in range(max(extra, 0))]
    words = int(np.clip(rng.lognormal(np.log(35), 1.1), 0, 600))
    tail = _phrase(rng, vocab, words) + "." if words else ""
    description = " ".join(s for s in (product.description, tail) if s)
    text = format_catalog(product.item_name, bullets, description, product.value, product.unit)
    return replace(product, catalog_content=text, bullets=tuple(bullets), description=description)


def render_image(product: _Product, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the product: category background and shape, size as scale, pack as tokens, premium
    tier as a gold border, deluxe as a red badge. Plain shapes, no fonts: identical everywhere.
    """
    jitter = rng.integers(-12, 13, size=3)
    background = tuple(
        int(np.clip(c + j, 0, 255)) for c, j in zip(product.background, jitter, strict=True)
    )
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    s = size / 128.0
    height = (50 + 40 * product.scale) * s
    width = height * (0.45 if product.shape in ("bottle", "can") else 0.7)
    cx = size / 2 + float(rng.integers(-4, 5)) * s
    bottom = size - 26 * s
    left, right, top = cx - width / 2, cx + width / 2, bottom - height
    colour = product.colour
    if product.shape == "bag":
        draw.polygon(
            [(left, top), (right, top), (right + 6 * s, bottom), (left - 6 * s, bottom)],
            fill=colour,
        )
        draw.rectangle([left, top, right, top + 6 * s], fill=(235, 235, 235))
    elif product.shape == "box":
        draw.rectangle([left, top, right, bottom], fill=colour)
        draw.rectangle([left + 5 * s, top + 5 * s, right - 5 * s, top + height / 3], fill="white")
    elif product.shape == "bottle":
        neck = width / 3
        draw.rectangle([cx - neck / 2, top, cx + neck / 2, top + height / 4], fill=colour)
        draw.rounded_rectangle([left, top + height / 4, right, bottom], radius=6 * s, fill=colour)
    elif product.shape == "can":
        draw.rectangle([left, top + 4 * s, right, bottom - 4 * s], fill=colour)
        draw.ellipse([left, top, right, top + 8 * s], fill=(200, 200, 200))
        draw.ellipse([left, bottom - 8 * s, right, bottom], fill=colour)
    else:  # jar
        draw.rounded_rectangle([left, top + 8 * s, right, bottom], radius=8 * s, fill=colour)
        draw.rectangle([left + 4 * s, top, right - 4 * s, top + 9 * s], fill=(90, 90, 90))
    label_top = top + height * 0.45
    draw.rectangle([left + 3 * s, label_top, right - 3 * s, label_top + 12 * s], fill="white")
    for k in range(min(product.pack, 6)):  # one token per item in the pack, at most six
        x = 10 * s + k * 14 * s
        draw.rectangle([x, size - 18 * s, x + 10 * s, size - 8 * s], fill=(60, 60, 60))
    if product.pack > 6:
        draw.rectangle([10 * s, size - 6 * s, 94 * s, size - 3 * s], fill=(60, 60, 60))
    if product.deluxe:
        draw.ellipse([size - 34 * s, 8 * s, size - 10 * s, 32 * s], fill=(200, 30, 30))
    if product.premium:
        border = max(int(6 * s), 2)
        draw.rectangle([0, 0, size - 1, size - 1], outline=GOLD, width=border)
    return image


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _corrupt(data: bytes, rng: np.random.Generator) -> bytes:
    """A truncated JPEG (header intact, body cut) or plain garbage: both must be rejected."""
    if rng.random() < 0.5:
        return data[: max(len(data) // 3, 16)]
    return bytes(rng.integers(0, 256, size=2048, dtype=np.uint8))


def _link_base(out_dir: Path) -> str:
    """Image links relative to the repo root (the working directory) when out_dir is inside it."""
    images = out_dir / "images"
    if images.is_absolute():
        try:
            images = images.relative_to(Path.cwd())
        except ValueError:
            return images.as_posix()
    return images.as_posix()


def _validate(cfg: DemoConfig) -> None:
    if cfg.n_train < 10 or cfg.n_test < 1:
        raise ValueError(
            f"demo needs n_train >= 10 and n_test >= 1, got {cfg.n_train}/{cfg.n_test}"
        )
    if cfg.image_size < 32:
        raise ValueError(f"demo.image_size must be at least 32 px, got {cfg.image_size}")
    rates = (cfg.missing_image_rate, cfg.broken_link_rate, cfg.corrupt_image_rate)
    if any(r < 0 for r in rates) or sum(rates) > 0.5:
        raise ValueError(f"demo image fault rates must be >= 0 and sum to <= 0.5, got {rates}")
    if not 0.0 < cfg.image_share <= 1.0:
        raise ValueError(f"demo.image_share must be in (0, 1], got {cfg.image_share}")


def _listings(cfg: DemoConfig, rng: np.random.Generator) -> tuple[list[_Product], int]:
    """Train rows, then test rows; a relist reuses an earlier train product. -> (rows, relists)"""
    brands = _brands(rng)
    rows: list[_Product] = []
    relists = 0
    for i in range(cfg.n_train + cfg.n_test):
        in_test = i >= cfg.n_train
        rate = RELIST_RATE_TEST if in_test else RELIST_RATE_TRAIN
        if i >= 20 and rng.random() < rate:
            rows.append(rows[int(rng.integers(min(i, cfg.n_train)))])
            relists += 1
        else:
            rows.append(_new_product(rng, i, brands))
    return rows, relists


def _image_faults(
    rows: list[_Product], cfg: DemoConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row masks (missing link, broken link, corrupt file), exact counts, disjoint.

    Faults go only to rows whose image no other row uses, so each row's fate is its own.
    """
    n = len(rows)
    usage = pd.Series([r.image_name for r in rows]).map(
        pd.Series([r.image_name for r in rows]).value_counts()
    )
    eligible = np.flatnonzero(usage.to_numpy() == 1)
    counts = [
        round(rate * n)
        for rate in (cfg.missing_image_rate, cfg.broken_link_rate, cfg.corrupt_image_rate)
    ]
    chosen = rng.permutation(eligible)[: sum(counts)]
    masks = []
    start = 0
    for count in counts:
        mask = np.zeros(n, dtype=bool)
        mask[chosen[start : start + count]] = True
        masks.append(mask)
        start += count
    return masks[0], masks[1], masks[2]


def _clear_old_images(images_dir: Path) -> None:
    """Drop images of an earlier generation: a stale file would turn a broken link into a good one.

    Only files this generator names (img_*.jpg) are touched.
    """
    if images_dir.is_dir():
        for path in images_dir.glob(f"{IMAGE_PREFIX}*.jpg"):
            path.unlink()


def generate_demo(cfg: DemoConfig, seed: int, out_dir: Path | None = None) -> str:
    """Write train.csv, test.csv and images/ under out_dir (default cfg.out_dir); return a summary.

    Same seed and config -> byte-identical files. Image links are relative to the working
    directory (the repo root), e.g. `data/raw/demo/images/img_00017.jpg`.
    """
    _validate(cfg)
    out_dir = Path(out_dir if out_dir is not None else cfg.out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    _clear_old_images(images_dir)
    rng = np.random.default_rng(seed)

    rows, relists = _listings(cfg, rng)
    n = len(rows)
    sample_ids = rng.choice(np.arange(100_000, 1_000_000), size=n, replace=False)
    noise = np.exp(rng.normal(0.0, NOISE_SIGMA, size=n))
    prices = np.maximum(np.round([r.price_rule for r in rows] * noise, 2), 0.5)
    missing, broken, corrupt = _image_faults(rows, cfg, rng)
    if cfg.long_text:
        rows = _long_texts(rows, np.random.default_rng([seed, 2]))
    if cfg.image_share < 1.0:  # its own stream: the default draws stay as they were
        missing |= np.random.default_rng([seed, 3]).random(n) >= cfg.image_share

    base = _link_base(out_dir)
    links = ["" if missing[i] else f"{base}/{rows[i].image_name}" for i in range(n)]
    written: set[str] = set()
    image_rng = np.random.default_rng([seed, 1])
    for i, row in enumerate(rows):
        if missing[i] or broken[i] or row.image_name in written:
            continue
        data = _jpeg_bytes(render_image(row, cfg.image_size, image_rng))
        if corrupt[i]:
            data = _corrupt(data, image_rng)
        (images_dir / row.image_name).write_bytes(data)
        written.add(row.image_name)

    frame = pd.DataFrame(
        {
            "sample_id": sample_ids,
            "catalog_content": [r.catalog_content for r in rows],
            "image_link": links,
            "price": prices,
        }
    )
    train = frame.iloc[: cfg.n_train]
    test = frame.iloc[cfg.n_train :].drop(columns=["price"])
    _write_csv(train, out_dir / "train.csv")
    _write_csv(test, out_dir / "test.csv")

    premium = sum(r.premium for r in rows)
    return (
        f"Demo data (seed {seed}) in {out_dir}: {cfg.n_train} train and {cfg.n_test} test rows "
        f"across {len(_CATEGORIES)} product categories, train prices "
        f"{train['price'].min():.2f}-{train['price'].max():.2f} "
        f"(median {train['price'].median():.2f}); {relists} relisted duplicates; "
        f"{len(written)} images of {cfg.image_size}px ({int(corrupt.sum())} deliberately corrupt), "
        f"{int(missing.sum())} rows without an image link and {int(broken.sum())} links to "
        f"absent files; {premium} rows of premium brands (gold border). Prices follow a hidden "
        f"rule: category base x quantity^elasticity x pack^{PACK_ELASTICITY} x brand tier x "
        f"deluxe badge (image only) x lognormal noise (sigma {NOISE_SIGMA})."
    )


def _long_texts(rows: list[_Product], rng: np.random.Generator) -> list[_Product]:
    """Every row with a long text; a relisted row keeps the text of the product it relists."""
    vocab = _vocabulary(rng)
    longer: dict[int, _Product] = {}
    for row in rows:
        if id(row) not in longer:
            longer[id(row)] = _lengthen(row, rng, vocab)
    return [longer[id(row)] for row in rows]


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Atomic write with fixed formatting, so reruns are byte-identical and readers never see
    half a file."""
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n", float_format="%.2f")
    os.replace(tmp, path)
