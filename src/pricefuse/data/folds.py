"""Cross-validation folds that keep duplicates together and balance prices.

Why groups: the catalog repeats products (the same image, near-identical names) at different
prices. If copies sit in different folds, out-of-fold predictions see their twin during training,
OOF SMAPE looks better than the test score, and the ensemble and KNN correction fit on leaked
predictions. Rows sharing a normalised text key OR an image key are linked, and every connected
component goes to one fold. Why stratify: price is heavy-tailed; a fold that happens to get most
of the expensive products makes fold scores incomparable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
MAX_PRICE_BINS = 10


def text_group_key(texts: Iterable[object]) -> list[str]:
    """Lower case, punctuation and spacing removed: "Tea, 12 oz." and "tea 12 OZ" are one key."""
    return [_NON_ALNUM.sub(" ", t.lower()).strip() if isinstance(t, str) else "" for t in texts]


def _key_codes(keys: Sequence[object]) -> np.ndarray:
    """Integer code per row, -1 for empty/None keys (which link nothing)."""
    cleaned = pd.Series(
        [k if isinstance(k, str) and k.strip() else None for k in keys], dtype=object
    )
    codes, _ = pd.factorize(cleaned, use_na_sentinel=True)
    return codes


def group_ids(text_keys: Sequence[object], image_keys: Sequence[object]) -> np.ndarray:
    """Connected components of "shares a text key or an image key"; one id per row.

    A graph with one node per row and per distinct key, an edge row-key for each non-empty key,
    makes transitive links (A shares text with B, B shares an image with C) one group.
    """
    n = len(text_keys)
    if len(image_keys) != n:
        raise ValueError(f"text_keys ({n}) and image_keys ({len(image_keys)}) differ in length")
    text_codes = _key_codes(text_keys)
    image_codes = _key_codes(image_keys)
    n_text = int(text_codes.max()) + 1 if n else 0
    n_image = int(image_codes.max()) + 1 if n else 0
    rows = np.arange(n)
    has_text = text_codes >= 0
    has_image = image_codes >= 0
    src = np.concatenate([rows[has_text], rows[has_image]])
    dst = np.concatenate([n + text_codes[has_text], n + n_text + image_codes[has_image]])
    size = n + n_text + n_image
    graph = coo_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    # Renumber in order of first appearance so ids do not depend on key spellings.
    return pd.factorize(labels[:n])[0].astype(np.int64)


def _price_bins(group_price: np.ndarray, n_folds: int) -> np.ndarray:
    """Quantile bin of each group's mean log price; few bins when there are few groups."""
    n_bins = int(np.clip(group_price.size // (2 * n_folds), 1, MAX_PRICE_BINS))
    if n_bins == 1:
        return np.zeros(group_price.size, dtype=np.int64)
    ranks = pd.Series(group_price).rank(method="first").to_numpy()
    return np.minimum(((ranks - 1) * n_bins / group_price.size).astype(np.int64), n_bins - 1)


def _emptiest(order: np.ndarray, bin_rows: np.ndarray, fold_rows: np.ndarray) -> int:
    """First fold in `order` with the fewest rows of the bin, then the fewest rows overall."""
    best = int(order[0])
    for f in order[1:]:
        if (bin_rows[f], fold_rows[f]) < (bin_rows[best], fold_rows[best]):
            best = int(f)
    return best


def assign_group_folds(
    text_keys: Sequence[object],
    image_keys: Sequence[object],
    log_price: np.ndarray | Sequence[float],
    n_folds: int,
    seed: int,
) -> np.ndarray:
    """Fold id (0..n_folds-1) per row: groups never straddle folds, price bins are balanced.

    Within each price bin, groups are shuffled (seeded), the largest placed first, each into the
    fold holding the fewest rows of that bin (ties: fewest rows overall, then a seeded order).
    """
    log_price = np.asarray(log_price, dtype=np.float64)
    n = log_price.size
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if len(text_keys) != n:
        raise ValueError(f"{len(text_keys)} text keys for {n} prices")
    if not np.isfinite(log_price).all():
        raise ValueError("log_price has non-finite values; drop those rows before assigning folds")
    groups = group_ids(text_keys, image_keys)
    n_groups = int(groups.max()) + 1 if n else 0
    if n_groups < n_folds:
        raise ValueError(f"{n_groups} distinct product groups cannot fill {n_folds} folds")

    sizes = np.bincount(groups, minlength=n_groups)
    group_price = np.bincount(groups, weights=log_price, minlength=n_groups) / sizes
    bins = _price_bins(group_price, n_folds)
    rng = np.random.default_rng(seed)
    fold_rows = np.zeros(n_folds, dtype=np.int64)
    group_fold = np.empty(n_groups, dtype=np.int64)
    for b in np.unique(bins):
        members = rng.permutation(np.flatnonzero(bins == b))
        members = members[np.argsort(-sizes[members], kind="stable")]
        bin_rows = np.zeros(n_folds, dtype=np.int64)
        tie_order = rng.permutation(n_folds)
        for g in members:
            fold = _emptiest(tie_order, bin_rows, fold_rows)
            group_fold[g] = fold
            bin_rows[fold] += sizes[g]
            fold_rows[fold] += sizes[g]
    return group_fold[groups]


def fold_keys(parsed: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(text keys, image keys) for `assign_group_folds` from a parsed table.

    Text key: the normalised item name (the whole text when a row has no name): relistings
    change bullets and descriptions far more often than the name. Image key: the cached image
    path, else the raw link, so rows sharing an image are grouped even when it was not fetched.
    """
    names = text_group_key(parsed["item_name"])
    texts = text_group_key(parsed["text"])
    text_keys = [name or text for name, text in zip(names, texts, strict=True)]
    links = parsed["image_link"] if "image_link" in parsed else pd.Series([""] * len(parsed))
    paths = parsed["image_path"] if "image_path" in parsed else pd.Series([""] * len(parsed))
    image_keys = [
        p if isinstance(p, str) and p else (lk.strip() if isinstance(lk, str) else "")
        for p, lk in zip(paths.tolist(), links.tolist(), strict=True)
    ]
    return text_keys, image_keys
