"""`fetch_images`: every distinct link into the cache, one manifest row each.

The orchestration only: links the cache vouches for become "cached" rows, the rest go to one
fetch run, and the manifest of the completed run is committed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pricefuse.core.config import FetchConfig
from pricefuse.core.layout import IMAGE_OK_STATUSES
from pricefuse.data.images.cache import ImageCache
from pricefuse.data.images.http import Fetcher
from pricefuse.data.images.links import distinct_links
from pricefuse.data.images.records import STATUSES, LinkRecord

T = TypeVar("T")


@dataclass(frozen=True)
class FetchResult:
    """Outcome of one `fetch_images` call: manifest rows in input order plus run statistics."""

    records: tuple[LinkRecord, ...]
    manifest: Path
    seconds: float
    bytes_fetched: int  # bytes read from sources (network bodies and local files)
    skipped: int  # empty / non-string links (no row in the manifest)
    hosts_down: tuple[str, ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(record.status for record in self.records)
        return {status: counted.get(status, 0) for status in STATUSES}

    @property
    def paths(self) -> dict[str, str]:
        """link -> cached image path ("" when the link has no valid image)."""
        return {record.link: record.path for record in self.records}

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: counts per status, bytes, and throughput."""
        seconds = max(self.seconds, 1e-9)
        counts = self.counts
        return {
            **{f"n_{status}": float(n) for status, n in counts.items()},
            "n_links": float(len(self.records)),
            "n_skipped": float(self.skipped),
            "n_hosts_down": float(len(self.hosts_down)),
            "bytes_fetched": float(self.bytes_fetched),
            "bytes_cached": float(
                sum(r.bytes for r in self.records if r.status in IMAGE_OK_STATUSES)
            ),
            "seconds": self.seconds,
            "images_per_s": len(self.records) / seconds,
            "downloads_per_s": counts["ok"] / seconds,
        }


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run, also from code that already runs an event loop (notebooks): then the fetch
    gets its own loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(max_workers=1) as helper:
        return helper.submit(lambda: asyncio.run(factory())).result()


def fetch_images(
    links: Iterable[object],
    cache_dir: Path | str,
    cfg: FetchConfig,
    *,
    progress: Callable[[LinkRecord], None] | None = None,
) -> FetchResult:
    """Fetch every distinct link into `cache_dir`, validate it, and write the manifest.

    Links may be http(s) URLs, file:// URLs or paths; blank and non-string entries are skipped.
    Links the cache already holds valid are not fetched again ("cached"). `progress` is called
    once per distinct link as it completes (from the thread running the fetch's event loop).
    Never raises for a bad link: every outcome is a manifest row.
    """
    started = time.perf_counter()
    unique, skipped = distinct_links(links)
    cache = ImageCache(cache_dir, cfg)
    records: dict[str, LinkRecord] = {}

    def done(record: LinkRecord) -> None:
        records[record.link] = record
        if progress is not None:
            progress(record)

    todo: list[str] = []
    for link in unique:
        record = cache.trusted(link)
        if record is None:
            todo.append(link)
        else:
            done(record)

    fetcher = Fetcher(cache, cfg, done)
    if todo:
        threads = max(2, min(8, os.cpu_count() or 2))
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pricefuse-img") as pool:
            try:
                _run_coroutine(lambda: fetcher.run(todo, pool))
            finally:
                cache.close_journal()
    manifest = cache.commit(records[link] for link in unique)
    return FetchResult(
        records=tuple(records[link] for link in unique),
        manifest=manifest,
        seconds=time.perf_counter() - started,
        bytes_fetched=fetcher.bytes_fetched,
        skipped=skipped,
        hosts_down=tuple(h.key for h in fetcher.hosts.values() if h.down_reason),
    )
