"""Identities of the official competition files, so a user's copy can be checked before a
multi-hour run (a truncated download parses fine and silently trains on fewer rows)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfficialFile:
    name: str
    size: int
    sha256: str


OFFICIAL_FILES = {
    "train.csv": OfficialFile(
        "train.csv", 73_495_639, "fd07612e95d309bf9e469bc03b81ebe699461c6c3438e0a58c1cfb891a0ca99d"
    ),
    "test.csv": OfficialFile(
        "test.csv", 73_160_208, "6d26bff5d51f657495209c07a9fce66cca786eee6b179f5617252fe3f62eaeba"
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_official(path: Path | str, kind: str | None = None) -> str | None:
    """None when `path` is the official file `kind` (default: its file name), else the problem."""
    path = Path(path)
    kind = kind or path.name
    if kind not in OFFICIAL_FILES:
        return f"{kind}: not an official file name (expected one of {sorted(OFFICIAL_FILES)})"
    expected = OFFICIAL_FILES[kind]
    if not path.is_file():
        return f"{path}: not found"
    size = path.stat().st_size
    if size != expected.size:
        return f"{path}: {size:,} bytes, the official {kind} has {expected.size:,} (partial copy?)"
    actual = sha256_of(path)
    if actual != expected.sha256:
        return f"{path}: sha256 {actual} differs from the official {expected.sha256}"
    return None
