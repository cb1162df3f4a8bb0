"""What an image link is: its kind (network or disk), its local path, the distinct usable ones."""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Literal


def link_kind(link: str) -> Literal["http", "file"]:
    """http(s) URLs go over the network; file:// URLs and plain paths are read from disk."""
    scheme = urllib.parse.urlsplit(link).scheme.lower()
    return "http" if scheme in ("http", "https") else "file"


def local_path(link: str) -> Path:
    """Path of a file:// URL or a plain path (relative paths are relative to the cwd)."""
    parts = urllib.parse.urlsplit(link)
    if parts.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return Path(link)


def distinct_links(links: Iterable[object]) -> tuple[list[str], int]:
    """Distinct usable links in first-seen order, and how many entries were skipped.

    Non-strings (NaN, None, pandas NA) and blank strings are skipped; a link is kept exactly as
    given so the manifest joins back onto the raw `image_link` column.
    """
    seen: dict[str, None] = {}
    skipped = 0
    for link in links:
        if not isinstance(link, str) or not link.strip():
            skipped += 1
            continue
        seen.setdefault(link, None)
    return list(seen), skipped
