"""The manifest row: what happened to one distinct link.

Its own module because the cache (manifest and journal), the fetcher and the fetch result all
speak in these rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STATUSES = ("ok", "cached", "missing", "bad", "failed")

Status = Literal["ok", "cached", "missing", "bad", "failed"]


@dataclass(frozen=True)
class LinkRecord:
    """One manifest row: what happened to one distinct link.

    `bytes` is the size of the cached file for ok/cached, the size of the rejected body for bad,
    else 0. `attempts` counts requests made in this run (0 for cached). `path` is relative to
    the working directory when the cache lies under it (else absolute), "" without an image.
    """

    link: str
    path: str
    status: Status
    bytes: int = 0
    attempts: int = 0
    error: str = ""

    def as_row(self) -> tuple[str, str, str, str, str, str]:
        return (
            self.link,
            self.path,
            self.status,
            str(self.bytes),
            str(self.attempts),
            self.error,
        )
