"""Row-order fingerprint shared by every stage that stores per-row arrays.

Embedding matrices are plain .npy files aligned with the parsed table by position. A downstream
stage compares this hash (recorded in features/meta.json) with the hash of the table it reads,
so a re-run of preprocess that reorders or drops rows fails loudly instead of silently pairing
rows with another product's embedding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def row_hash(sample_ids: Iterable[object]) -> str:
    """sha256 over the ids in order, as text: stable across int/str id dtypes and platforms."""
    digest = hashlib.sha256()
    count = 0
    for sample_id in sample_ids:
        digest.update(str(sample_id).encode("utf-8"))
        digest.update(b"\n")
        count += 1
    digest.update(f"n={count}".encode())
    return digest.hexdigest()
