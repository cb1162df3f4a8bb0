"""The asynchronous fetch run: concurrent requests, retries with backoff and Retry-After, and
host-down detection.

Why: the image CDN throttles (429/503) and drops connections, so every request is classified
(body, retry, missing, bad, failed) and retried with jittered backoff; a host that keeps refusing
connections is declared down so its remaining links fail at once. Decoding and writing run in a
thread pool so the event loop keeps the sockets busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pricefuse import __version__
from pricefuse.core.config import FetchConfig
from pricefuse.data.images.cache import ImageCache, cache_stem
from pricefuse.data.images.links import link_kind, local_path
from pricefuse.data.images.records import LinkRecord
from pricefuse.data.images.validate import ImageRejected

if TYPE_CHECKING:  # aiohttp is imported on first network fetch, not for cache hits or serving
    import aiohttp

log = logging.getLogger(__name__)

_MISSING_STATUSES = frozenset({403, 404, 410})
_RETRY_STATUSES = frozenset({408, 425, 429})
USER_AGENT = f"pricefuse/{__version__} (image fetch)"
_ERROR_BODY_LIMIT = 1 << 16


def _host_key(link: str) -> str:
    parts = urllib.parse.urlsplit(link)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


@dataclass
class _Host:
    """Per-host state shared by all workers: reachability and a Retry-After pause."""

    key: str
    consecutive_connect_failures: int = 0
    down_reason: str = ""
    resume_at: float = 0.0


@dataclass
class _Attempt:
    """What one request produced; `kind` drives the retry loop."""

    kind: Literal["body", "retry", "missing", "bad", "failed"]
    error: str = ""
    data: bytes = b""
    content_type: str = ""
    framed: bool = True  # body length known (Content-Length/chunked): truncation was detectable
    retry_after: float | None = None
    connect_failure: bool = False


class _TooLarge(Exception):
    pass


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, cfg: FetchConfig, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half the step fixed, half random, so retries of
    many links hitting the same throttle spread out instead of returning in lockstep."""
    step = min(cfg.backoff_max, cfg.backoff_base * (2 ** max(0, attempt - 1)))
    return step / 2 + (rng or random).uniform(0, step / 2)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class Fetcher:
    """One fetch run over the links the cache could not vouch for."""

    def __init__(
        self,
        cache: ImageCache,
        cfg: FetchConfig,
        done: Callable[[LinkRecord], None],
    ) -> None:
        self.cache = cache
        self.cfg = cfg
        self.done = done
        self.pool: ThreadPoolExecutor | None = None
        self.hosts: dict[str, _Host] = {}
        self.bytes_fetched = 0
        self.rng = random.Random()

    async def run(self, links: list[str], pool: ThreadPoolExecutor) -> None:
        """Fetch `links` with `cfg.concurrency` workers; decoding and writing run in `pool`
        (PIL and file I/O release the GIL), so the event loop keeps the sockets busy."""
        import aiohttp

        self.pool = pool

        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout
        )
        connector = aiohttp.TCPConnector(
            limit=max(1, self.cfg.concurrency),
            limit_per_host=max(1, self.cfg.per_host),
            ttl_dns_cache=300,
        )
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers={"User-Agent": USER_AGENT}
        ) as session:
            pending = iter(links)
            workers = [
                asyncio.create_task(self._worker(session, pending))
                for _ in range(min(max(1, self.cfg.concurrency), len(links)))
            ]
            await asyncio.gather(*workers)

    async def _worker(self, session: aiohttp.ClientSession, pending: Iterator[str]) -> None:
        for link in pending:  # one event-loop thread: sharing the iterator is safe
            record = await self._one(session, link)
            if record.status == "ok":
                self.cache.journal(record)
            self.done(record)

    async def _one(self, session: aiohttp.ClientSession, link: str) -> LinkRecord:
        loop = asyncio.get_running_loop()
        if cache_stem(link) in self.cache.existing:
            record = await loop.run_in_executor(self.pool, self.cache.verify_unrecorded, link)
            if record is not None:
                return record
        if link_kind(link) == "http":
            return await self._fetch_http(session, link)
        return await self._fetch_file(link)

    async def _fetch_file(self, link: str) -> LinkRecord:
        loop = asyncio.get_running_loop()
        path = local_path(link)
        try:
            data = await loop.run_in_executor(self.pool, self._read_local, path)
            self.bytes_fetched += len(data)
        except FileNotFoundError:
            return LinkRecord(link, "", "missing", 0, 1, f"no such file: {path}")
        except _TooLarge:
            return LinkRecord(
                link, "", "bad", 0, 1, f"file larger than fetch.max_bytes={self.cfg.max_bytes}"
            )
        except OSError as exc:
            return LinkRecord(link, "", "failed", 0, 1, f"cannot read {path}: {_short(exc)}")
        try:
            cached, size = await loop.run_in_executor(self.pool, self.cache.store, link, data)
        except ImageRejected as exc:
            return LinkRecord(link, "", "bad", len(data), 1, str(exc))
        return LinkRecord(link, cached, "ok", size, 1, "")

    def _read_local(self, path: Path) -> bytes:
        if path.stat().st_size > self.cfg.max_bytes:
            raise _TooLarge
        return path.read_bytes()

    def _host(self, link: str) -> _Host:
        key = _host_key(link)
        host = self.hosts.get(key)
        if host is None:
            host = self.hosts[key] = _Host(key)
        return host

    async def _fetch_http(self, session: aiohttp.ClientSession, link: str) -> LinkRecord:
        loop = asyncio.get_running_loop()
        host = self._host(link)
        attempts = 0
        while True:
            if host.down_reason:
                return LinkRecord(link, "", "failed", 0, attempts, host.down_reason)
            wait = host.resume_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # the host may have gone down meanwhile
            attempts += 1
            outcome = await self._request(session, link)
            self._note_reachability(host, outcome)
            if outcome.kind == "missing":
                return LinkRecord(link, "", "missing", 0, attempts, outcome.error)
            if outcome.kind == "failed":
                return LinkRecord(link, "", "failed", 0, attempts, outcome.error)
            if outcome.kind == "bad":
                return LinkRecord(link, "", "bad", len(outcome.data), attempts, outcome.error)
            if outcome.kind == "body":
                try:
                    cached, size = await loop.run_in_executor(
                        self.pool, self.cache.store, link, outcome.data, outcome.content_type
                    )
                    return LinkRecord(link, cached, "ok", size, attempts, "")
                except ImageRejected as exc:
                    # Only an unframed body can be cut short unnoticed; anything else the
                    # server will send the same way again.
                    if exc.kind != "undecodable" or outcome.framed:
                        return LinkRecord(link, "", "bad", len(outcome.data), attempts, str(exc))
                    outcome.error = f"{exc} (body without length: retrying)"
            if attempts > self.cfg.retries:
                return LinkRecord(
                    link, "", "failed", 0, attempts, f"{outcome.error} (gave up after {attempts})"
                )
            delay = backoff_delay(attempts, self.cfg, self.rng)
            if outcome.retry_after is not None:
                if outcome.retry_after > self.cfg.backoff_max:
                    return LinkRecord(
                        link,
                        "",
                        "failed",
                        0,
                        attempts,
                        f"{outcome.error}: Retry-After {outcome.retry_after:.0f}s exceeds "
                        f"fetch.backoff_max={self.cfg.backoff_max:g}",
                    )
                delay = max(delay, outcome.retry_after)
                host.resume_at = max(host.resume_at, loop.time() + outcome.retry_after)
            await asyncio.sleep(delay)

    def _note_reachability(self, host: _Host, outcome: _Attempt) -> None:
        """Count consecutive connection failures per host; past the threshold, declare it down
        so its remaining links fail at once instead of each waiting out its own timeouts."""
        if not outcome.connect_failure:
            host.consecutive_connect_failures = 0
            return
        host.consecutive_connect_failures += 1
        threshold = max(1, self.cfg.host_fail_threshold)
        if host.consecutive_connect_failures >= threshold and not host.down_reason:
            host.down_reason = (
                f"host unreachable: {host.key} ({host.consecutive_connect_failures} consecutive "
                f"connection failures, last: {outcome.error})"
            )
            log.warning("%s; skipping its remaining links as failed", host.down_reason)

    async def _request(self, session: aiohttp.ClientSession, link: str) -> _Attempt:
        """One GET: classify the response or error (no sleeping, no retry decisions here)."""
        import aiohttp

        try:
            async with session.get(link) as response:
                status = response.status
                content_type = response.headers.get("Content-Type", "")
                if 200 <= status < 300:
                    return await self._read_body(response, content_type)
                await self._drain(response)
                error = f"HTTP {status}"
                if status in _MISSING_STATUSES:
                    return _Attempt("missing", error)
                if status in _RETRY_STATUSES or status >= 500:
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    return _Attempt("retry", error, retry_after=retry_after)
                return _Attempt("failed", error)
        except _TooLarge:
            return _Attempt("bad", f"body larger than fetch.max_bytes={self.cfg.max_bytes}")
        except (
            aiohttp.ClientSSLError,
            aiohttp.InvalidURL,
            aiohttp.RedirectClientError,
            aiohttp.TooManyRedirects,
        ) as exc:
            return _Attempt(
                "failed",
                f"{type(exc).__name__}: {_short(exc)}",
                connect_failure=isinstance(exc, aiohttp.ClientSSLError),
            )
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            return _Attempt("retry", f"cannot connect: {_short(exc)}", connect_failure=True)
        except TimeoutError:
            return _Attempt("retry", f"no data for {self.cfg.read_timeout:g}s (read timeout)")
        except aiohttp.ClientPayloadError as exc:
            return _Attempt("retry", f"truncated body: {_short(exc)}")
        except (aiohttp.ClientError, OSError) as exc:
            return _Attempt("retry", f"{type(exc).__name__}: {_short(exc)}")

    async def _read_body(self, response: aiohttp.ClientResponse, content_type: str) -> _Attempt:
        length = response.content_length
        if length is not None and length > self.cfg.max_bytes:
            return _Attempt(
                "bad", f"Content-Length {length} exceeds fetch.max_bytes={self.cfg.max_bytes}"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            self.bytes_fetched += len(chunk)
            if size > self.cfg.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
        chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
        return _Attempt(
            "body",
            data=b"".join(chunks),
            content_type=content_type,
            framed=length is not None or chunked,
        )

    async def _drain(self, response: aiohttp.ClientResponse) -> None:
        """Read a small error body so the connection can be reused; big ones just close."""
        length = response.content_length
        if length is not None and length <= _ERROR_BODY_LIMIT:
            with contextlib.suppress(Exception):
                await response.read()
