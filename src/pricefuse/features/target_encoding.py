"""Smoothed target encoding of a categorical key, fitted inside a fold without leaking.

A key's encoding is its rows' mean log price shrunk towards the fit rows' mean:
(sum + m * prior) / (count + m), so a brand seen twice says little and one seen two hundred times
says a lot. Why it must be fitted with care: a row's own price inside its key's mean is a leak
that trees find at once (the encoding of a brand seen twice is half that row's price). So

- rows the booster is *trained* on get encodings fitted on the other inner groups only
  (`out_of_group`: the project's group folds among the fit rows, so near-duplicate listings,
  which share a group, never encode each other);
- held-out, test and served rows get the encoding fitted on every fit row (`Encoding`), the
  same table the training rows' encodings approximate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

SMOOTHING = 10.0  # pseudo-rows of the prior in each key's mean (m above)


@dataclass(frozen=True)
class Encoding:
    """Key -> smoothed mean target, the prior for unseen keys, and each key's row count."""

    table: dict[str, float]
    counts: dict[str, int]
    prior: float

    @classmethod
    def fit(cls, keys: Sequence[str], y: np.ndarray, smoothing: float = SMOOTHING) -> Self:
        y = np.asarray(y, dtype=np.float64)
        if len(keys) != len(y):
            raise ValueError(f"{len(keys)} keys for {len(y)} targets")
        prior = float(y.mean()) if len(y) else 0.0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for key, target in zip(keys, y, strict=True):
            if not key:  # no key read from the row: nothing to share with other rows
                continue
            sums[key] = sums.get(key, 0.0) + float(target)
            counts[key] = counts.get(key, 0) + 1
        table = {k: (sums[k] + smoothing * prior) / (counts[k] + smoothing) for k in sums}
        return cls(table, counts, prior)

    def transform(self, keys: Sequence[str]) -> np.ndarray:
        """Each key's encoding (the prior for keys never seen, and for "")."""
        return np.array([self.table.get(k, self.prior) for k in keys], dtype=np.float64)

    def log_counts(self, keys: Sequence[str]) -> np.ndarray:
        """log1p of each key's fit-row count (0 for unseen keys): how much the encoding knows."""
        return np.log1p(np.array([self.counts.get(k, 0) for k in keys], dtype=np.float64))

    def state(self) -> dict[str, Any]:
        return {"table": self.table, "counts": self.counts, "prior": self.prior}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Self:
        return cls(
            {str(k): float(v) for k, v in state["table"].items()},
            {str(k): int(v) for k, v in state["counts"].items()},
            float(state["prior"]),
        )


def out_of_group(
    keys: Sequence[str], y: np.ndarray, groups: np.ndarray, smoothing: float = SMOOTHING
) -> np.ndarray:
    """Each row's encoding fitted on the rows of the other groups only (and its log count
    there): (encodings, log counts). With fewer than two groups no row can be encoded without
    itself, so every row gets the prior and a count of 0."""
    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    keys = list(keys)
    encoded = np.full(len(keys), float(y.mean()) if len(y) else 0.0)
    counts = np.zeros(len(keys))
    labels = np.unique(groups)
    if len(labels) < 2:
        return np.stack([encoded, counts])
    for label in labels:
        inside = groups == label
        others = [k for k, keep in zip(keys, ~inside, strict=True) if keep]
        encoding = Encoding.fit(others, y[~inside], smoothing)
        mine = [k for k, keep in zip(keys, inside, strict=True) if keep]
        encoded[inside] = encoding.transform(mine)
        counts[inside] = encoding.log_counts(mine)
    return np.stack([encoded, counts])
