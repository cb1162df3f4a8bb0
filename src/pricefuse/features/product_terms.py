"""What an item name says about the product beyond its size: the brand and the product type.

Why: the winning teams of the Amazon ML Challenge 2025 added hand features to their text models,
brand and product type among them (Team Rocket: ~3.6 points with nine of them). A brand's price
level and a product type's price per unit move a price more than any single word, and a tree
cannot assemble them from a 32-component text PCA. Both are read from the item name as written,
with no fitted state; what they are worth is fitted per fold (pricefuse.features.target_encoding).

Brand: the catalog has no brand field (a "Brand:" line in under 1% of the real rows), but names
lead with it ("La Victoria Green Taco Sauce", "Member's Mark Basil"). `brand_of` reads the first
word, lower-cased, possessive and punctuation dropped, or "by <Brand>" where the name says so;
`brand_pair_of` the first two words, which separates "member's mark" from "member's choice".
Product type: the first of an ordered list of patterns that matches (specific before generic:
"peanut butter" is a spread, not dairy), "other" when none does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Words that lead a name without being its brand: the brand then is the next word.
_LEADING_NOISE = frozenset(
    {"the", "a", "an", "new", "organic", "premium", "pack", "case", "set", "bulk", "original"}
)
_WORD = re.compile(r"[a-z0-9][a-z0-9&'’.-]*", re.IGNORECASE)
_BY_BRAND = re.compile(r"\bby\s+([A-Z][\w&'’.-]*)")
UNKNOWN = ""

# (type, pattern) in priority order: the first match names the type.
PRODUCT_TYPES: tuple[tuple[str, str], ...] = (
    ("gift", r"\bgift (?:basket|box|set)s?\b|\bbaskets?\b|\bhampers?\b"),
    ("pet", r"\b(?:dog|dogs|cat|cats|puppy|kitten|pet)\b"),
    ("baby", r"\b(?:baby|infant|toddler)\b"),
    ("supplement", r"\b(?:supplements?|vitamins?|capsules?|tablets?|probiotics?|collagen)\b"),
    ("protein", r"\bprotein (?:powder|shake)s?\b|\bwhey\b"),
    ("coffee", r"\b(?:coffee|espresso|k-?cups?|cold brew|arabica)\b"),
    ("tea", r"\b(?:teas?|matcha|chai|yerba|rooibos|chamomile)\b"),
    ("wine", r"\b(?:wines?|sake|mirin)\b"),
    ("energy_drink", r"\b(?:energy|sports?) drinks?\b|\belectrolytes?\b"),
    ("drink", r"\b(?:juices?|sodas?|drinks?|beverages?|lemonade|water|smoothies?|cocktail)\b"),
    ("creamer", r"\b(?:creamers?|milk)\b"),
    ("spread", r"\b(?:peanut butter|nut butter|jam|jelly|preserves|spreads?|nutella)\b"),
    ("sweetener", r"\b(?:honey|syrups?|molasses|sweeteners?|agave|stevia)\b"),
    ("sauce", r"\b(?:sauces?|salsa|ketchup|mustard|dressings?|marinades?|vinegar|mayo\w*|dips?)\b"),
    ("oil", r"\b(?:oils?|ghee|shortening)\b"),
    ("seasoning", r"\b(?:seasonings?|spices?|rubs?|salt|pepper|peppercorns?|herbs?|curry)\b"),
    ("extract", r"\b(?:extracts?|flavou?rings?|food colou?r\w*|sprinkles|decorating)\b"),
    ("chocolate", r"\b(?:chocolates?|cocoa|truffles?)\b"),
    ("candy", r"\b(?:cand(?:y|ies)|gumm(?:y|ies|i)|lollipops?|licorice|mints?|toffee|gum)\b"),
    ("cookie", r"\b(?:cookies?|biscuits?|wafers?|brownies?)\b"),
    ("cracker", r"\b(?:crackers?|pretzels?|crisps?)\b"),
    ("chips", r"\b(?:chips|popcorn|puffs?)\b"),
    ("bar", r"\bbars?\b"),
    ("nuts", r"\b(?:nuts?|almonds?|cashews?|pecans?|pistachios?|walnuts?|peanuts?|trail mix)\b"),
    ("jerky", r"\b(?:jerky|meat sticks?)\b"),
    ("dried_fruit", r"\bdried\b|\b(?:raisins|dates|prunes)\b"),
    ("cereal", r"\b(?:cereals?|granola|oatmeal|oats|muesli)\b"),
    ("pasta", r"\b(?:pasta|noodles?|spaghetti|macaroni|ramen)\b"),
    ("rice", r"\b(?:rice|quinoa|grains?|couscous)\b"),
    ("baking", r"\b(?:flour|baking|cake mix|yeast|frosting|icing)\b"),
    ("sugar", r"\bsugar\b"),
    ("soup", r"\b(?:soups?|broth|bouillon|stock)\b"),
    ("beans", r"\b(?:beans?|lentils?|chickpeas?|vegetables?|tomato(?:es)?)\b"),
    ("meat", r"\b(?:chicken|beef|pork|tuna|salmon|fish|sardines?|turkey|ham|sausages?)\b"),
    ("cheese", r"\bcheese\b"),
    ("snack", r"\bsnacks?\b"),
)
_TYPE_PATTERNS = tuple((name, re.compile(p, re.IGNORECASE)) for name, p in PRODUCT_TYPES)
OTHER_TYPE = "other"


def _words(name: str) -> list[str]:
    words = []
    for token in _WORD.findall(name):
        word = token.lower().replace("’", "'").strip(".-'")
        if word.endswith("'s"):
            word = word[:-2]
        if word:
            words.append(word)
    return words


def brand_of(name: str) -> str:
    """The brand the name leads with ("by <Brand>" wins where present); "" when none."""
    by = _BY_BRAND.search(name)
    if by is not None:
        words = _words(by.group(1))
        if words:
            return words[0]
    words = _words(name)
    for word in words[:3]:
        if word not in _LEADING_NOISE and not word[0].isdigit():
            return word
    return UNKNOWN


def brand_pair_of(name: str) -> str:
    """The first two words of the name (the brand and what follows it); "" when none."""
    words = [w for w in _words(name) if not w[0].isdigit()]
    return " ".join(words[:2])


def product_type_of(name: str) -> str:
    """The first matching product type, else "other"."""
    for product_type, pattern in _TYPE_PATTERNS:
        if pattern.search(name):
            return product_type
    return OTHER_TYPE


def product_terms(names: Iterable[str]) -> dict[str, list[str]]:
    """The three keys of each name: {"brand": [...], "brand_pair": [...], "product_type": [...]}."""
    names = list(names)
    return {
        "brand": [brand_of(n) for n in names],
        "brand_pair": [brand_pair_of(n) for n in names],
        "product_type": [product_type_of(n) for n in names],
    }
