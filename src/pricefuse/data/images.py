"""Fetch, validate and cache product images; load one image for serving.

Why this is more than a download loop: the competition's image links point at a CDN that
throttles (429/503), drops connections and occasionally returns HTML or truncated bodies, and the
starter kit's loop left teams with partial JPEGs that decoded "fine" until training. Here an image
only counts once it has been fully decoded, cache files appear only by atomic rename, and every
link ends with one manifest row saying what happened (ok, cached, missing, bad, failed).

Cache layout under `cache_dir` (= `params.data.images_dir`):
- `files/<stem><ext>`: one file per link; `stem` is a hash of the link, so a link always maps to
  the same file and a restart can find it without any bookkeeping.
- `manifest.csv`: the last completed run (`layout.MANIFEST_COLUMNS`), written atomically.
- `journal.csv`: the same rows, appended as images land, so a run killed with `kill -9` resumes
  without re-downloading; merged into the manifest and removed when a run completes.
- `cache.json`: the settings that change file content (`max_side`); a change invalidates files.

The fast resume check trusts a file only when a manifest/journal row says it is valid *and* its
size matches; a file without such a row (a crash between rename and journal write) is decoded
once more instead of being downloaded again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import email.utils
import hashlib
import io
import json
import logging
import os
import random
import secrets
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

from PIL import Image, UnidentifiedImageError

from pricefuse import __version__
from pricefuse.config import DataConfig, FetchConfig
from pricefuse.layout import IMAGE_OK_STATUSES, MANIFEST_COLUMNS, Layout

if TYPE_CHECKING:  # aiohttp is imported on first network fetch, not for cache hits or serving
    import aiohttp

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUSES = ("ok", "cached", "missing", "bad", "failed")
DEFAULT_FETCH = FetchConfig()

# Formats a product image may come in. Restricting Image.open keeps PIL from handing untrusted
# bytes to exotic plugins (EPS would even start Ghostscript).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}
# Bump when the bytes written for the same input and settings change (invalidates caches).
_CACHE_FORMAT = 1
_JPEG_QUALITY = 90
_STEM_CHARS = 24
_FILES = "files"
_JOURNAL = "journal.csv"
_SETTINGS = "cache.json"
_PART_SUFFIX = ".part"
_MISSING_STATUSES = frozenset({403, 404, 410})
_RETRY_STATUSES = frozenset({408, 425, 429})
_USER_AGENT = f"pricefuse/{__version__} (image fetch)"
_ERROR_BODY_LIMIT = 1 << 16

Status = Literal["ok", "cached", "missing", "bad", "failed"]
RejectKind = Literal["too_large", "not_image", "too_many_pixels", "undecodable"]


# ---------------------------------------------------------------------------------------------
# Records and results
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Validation: decode fully, reject what is not an image we want
# ---------------------------------------------------------------------------------------------


class ImageRejected(ValueError):
    """Bytes that are not an acceptable image; `kind` says why (only `undecodable` may be a
    transport truncation worth retrying)."""

    def __init__(self, kind: RejectKind, message: str) -> None:
        super().__init__(message)
        self.kind: RejectKind = kind


@dataclass(frozen=True)
class PreparedImage:
    """The bytes to cache for one image: the original, or a downscaled re-encoding."""

    data: bytes
    ext: str
    size: tuple[int, int]
    source_size: tuple[int, int]
    format: str

    @property
    def downscaled(self) -> bool:
        return self.size != self.source_size


def _describe_non_image(data: bytes, content_type: str = "") -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "HTML page, not an image"
    kind = content_type or "unknown type"
    return f"not an image ({kind}, {len(data)} bytes)"


def _open_checked(data: bytes, cfg: FetchConfig, content_type: str) -> Image.Image:
    """Open `data` (header only) and apply the limits that must hold before decoding."""
    if not data:
        raise ImageRejected("not_image", "empty body")
    if len(data) > cfg.max_bytes:
        raise ImageRejected(
            "too_large", f"{len(data)} bytes exceeds fetch.max_bytes={cfg.max_bytes}"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageRejected("not_image", _describe_non_image(data, content_type)) from exc
    except Image.DecompressionBombError as exc:  # PIL's own, far higher limit hit first
        raise ImageRejected(
            "too_many_pixels", f"{exc} (fetch.max_pixels={cfg.max_pixels})"
        ) from exc
    except Exception as exc:  # malformed headers raise assorted errors inside plugins
        raise ImageRejected("undecodable", f"unreadable image header: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRejected("undecodable", f"invalid image size {width}x{height}")
    if width * height > cfg.max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"{width}x{height} pixels exceeds fetch.max_pixels={cfg.max_pixels}",
        )
    return image


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageRejected("undecodable", f"undecodable {image.format}: {exc}") from exc


def _validation_draft(image: Image.Image) -> None:
    """Let JPEG decode at 1/8 scale when only validity matters.

    Why this is still a full decode: libjpeg entropy-decodes every block of every scan whatever
    the output scale (only the inverse DCT is reduced), so a truncated or cut stream fails the
    same way; on the real product images the verdicts of both agree on every truncation point
    tried, at ~60% of the CPU. Other formats decode in full.
    """
    if image.format in ("JPEG", "MPO"):
        width, height = image.size
        image.draft(image.mode, (-(-width // 8), -(-height // 8)))


def validate_image(data: bytes, cfg: FetchConfig = DEFAULT_FETCH, content_type: str = "") -> str:
    """Decode all of `data`; return its format, or raise ImageRejected saying why it is unusable.

    Why decode everything: a truncated JPEG has a valid header, so `Image.open` (and even
    `verify()`) accept it; only decoding every block shows the missing data. Pixel limits are
    checked on the header first, so a decompression bomb never allocates its pixels.
    Relies on PIL's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`.
    """
    image = _open_checked(data, cfg, content_type)
    _validation_draft(image)
    _load(image)
    return str(image.format)


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _mode_for(image: Image.Image, target_format: str) -> Image.Image:
    if target_format == "JPEG":
        return image if image.mode in ("L", "RGB", "CMYK") else image.convert("RGB")
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def prepare_image(
    data: bytes, cfg: FetchConfig = DEFAULT_FETCH, content_type: str = ""
) -> PreparedImage:
    """Validate `data` (full decode) and return the bytes to cache.

    Within `cfg.max_side` the original bytes are kept (byte-identical, no generation loss);
    larger images are downscaled on the longer side and re-encoded (JPEG sources stay JPEG at
    quality 90, everything else becomes lossless PNG).
    """
    image = _open_checked(data, cfg, content_type)
    source_format = str(image.format)
    source_size: tuple[int, int] = image.size
    if cfg.max_side <= 0 or max(source_size) <= cfg.max_side:
        _validation_draft(image)  # the original bytes are kept: only validity matters
        _load(image)
        ext = _EXTENSIONS.get(source_format, ".img")
        return PreparedImage(data, ext, source_size, source_size, source_format)
    # JPEG can decode at 1/2, 1/4, 1/8 scale: it still reads the whole stream (truncation is
    # still caught) but skips computing pixels the downscale would throw away.
    image.draft(image.mode, _fit(source_size, cfg.max_side))
    _load(image)
    target = "JPEG" if source_format in ("JPEG", "MPO") else "PNG"
    exif = image.info.get("exif")
    icc = image.info.get("icc_profile")
    image = _mode_for(image, target)
    image.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    options: dict[str, Any] = {"icc_profile": icc} if icc else {}
    if target == "JPEG":
        options["quality"] = _JPEG_QUALITY
        if exif:
            options["exif"] = exif  # keeps the orientation tag consistent with the original
    image.save(out, format=target, **options)
    return PreparedImage(out.getvalue(), _EXTENSIONS[target], image.size, source_size, target)


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------


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


def cache_stem(link: str) -> str:
    """Deterministic file stem of a link: the same link always maps to the same cache file."""
    return hashlib.sha1(link.encode("utf-8")).hexdigest()[:_STEM_CHARS]


def _host_key(link: str) -> str:
    parts = urllib.parse.urlsplit(link)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


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


# ---------------------------------------------------------------------------------------------
# Manifest and journal
# ---------------------------------------------------------------------------------------------


def _record_from_row(row: list[str]) -> LinkRecord | None:
    if len(row) != len(MANIFEST_COLUMNS) or tuple(row) == MANIFEST_COLUMNS:
        return None
    link, path, status, size, attempts, error = row
    if status not in STATUSES:
        return None
    try:
        return LinkRecord(link, path, status, int(size), int(attempts), error)  # type: ignore[arg-type]
    except ValueError:  # a row cut short by a crash
        return None


def read_manifest(path: Path | str) -> dict[str, LinkRecord]:
    """link -> record from a manifest or journal; unreadable rows are ignored (a killed run may
    leave a half-written last line)."""
    path = Path(path)
    records: dict[str, LinkRecord] = {}
    if not path.is_file():
        return records
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        for row in csv.reader(handle):
            record = _record_from_row(row)
            if record is not None:
                records[record.link] = record
    return records


def write_manifest(path: Path | str, records: Iterable[LinkRecord]) -> Path:
    """Write the manifest atomically: readers see the old or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_PART_SUFFIX}")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(record.as_row() for record in records)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _atomic_write(directory: Path, name: str, data: bytes) -> None:
    """Write to a fresh temp file, then rename: the final name only ever holds complete bytes.

    No fsync: a killed process cannot lose written pages, and after a power loss the size check
    against the manifest (or a re-decode) catches a short file.
    """
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}{_PART_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# The cache directory
# ---------------------------------------------------------------------------------------------


class ImageCache:
    """The files directory, what previous runs recorded about it, and the journal of this run.

    Opening it removes `.part` leftovers of killed runs and, when the content settings changed
    since the files were written, the files themselves (they would no longer match the params).
    """

    def __init__(self, cache_dir: Path | str, cfg: FetchConfig) -> None:
        self.root = Path(cache_dir)
        self.files_dir = self.root / _FILES
        # The stage contract's path, derived so that the two cannot drift apart.
        self.manifest_path = Layout(DataConfig(images_dir=str(self.root))).manifest
        self.journal_path = self.root / _JOURNAL
        self.cfg = cfg
        self.files_dir.mkdir(parents=True, exist_ok=True)
        settings_ok = self._check_settings()
        self.existing: dict[str, str] = self._scan() if settings_ok else {}
        self.known: dict[str, LinkRecord] = {}
        if settings_ok:
            self.known = read_manifest(self.manifest_path)
            self.known.update(read_manifest(self.journal_path))
        self._prefix = self._path_prefix()
        self._journal: IO[str] | None = None

    def _settings(self) -> dict[str, int]:
        return {"format": _CACHE_FORMAT, "max_side": self.cfg.max_side}

    def _check_settings(self) -> bool:
        path = self.root / _SETTINGS
        wanted = self._settings()
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = None
        if current == wanted:
            return True
        if current is not None:
            log.info("image cache settings changed (%s -> %s): clearing %s", current, wanted, path)
        for entry in os.scandir(self.files_dir):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        self.journal_path.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}{_PART_SUFFIX}")
        tmp.write_text(json.dumps(wanted) + "\n")
        os.replace(tmp, path)
        return False

    def _scan(self) -> dict[str, str]:
        """stem -> file name of every cache file; deletes `.part` leftovers of killed runs."""
        existing: dict[str, str] = {}
        for entry in os.scandir(self.files_dir):
            name = entry.name
            if name.endswith(_PART_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                continue
            stem = name.partition(".")[0]
            if len(stem) == _STEM_CHARS:
                existing[stem] = name
        return existing

    def _path_prefix(self) -> str:
        files = self.files_dir.resolve()
        cwd = Path.cwd().resolve()
        return str(files.relative_to(cwd)) if files.is_relative_to(cwd) else str(files)

    def path_of(self, name: str) -> str:
        return os.path.join(self._prefix, name)

    def trusted(self, link: str) -> LinkRecord | None:
        """The fast resume check (one stat): a recorded valid file of the recorded size."""
        record = self.known.get(link)
        if record is None or record.status not in IMAGE_OK_STATUSES or record.bytes <= 0:
            return None
        name = self.existing.get(cache_stem(link))
        if name is None or os.path.basename(record.path) != name:
            return None
        try:
            size = os.stat(self.files_dir / name).st_size
        except OSError:
            return None
        if size != record.bytes:
            return None
        return LinkRecord(link, self.path_of(name), "cached", size, 0, "")

    def verify_unrecorded(self, link: str) -> LinkRecord | None:
        """A cache file no row vouches for (crash between rename and journal write): decode it
        once; valid files are kept, anything else is deleted so the link is fetched again."""
        stem = cache_stem(link)
        name = self.existing.get(stem)
        if name is None:
            return None
        path = self.files_dir / name
        try:
            data = path.read_bytes()
            validate_image(data, self.cfg)
        except (OSError, ImageRejected):
            path.unlink(missing_ok=True)
            self.existing.pop(stem, None)
            return None
        return LinkRecord(link, self.path_of(name), "cached", len(data), 0, "")

    def store(self, link: str, data: bytes, content_type: str = "") -> tuple[str, int]:
        """Validate and atomically write one image; returns (manifest path, size on disk)."""
        prepared = prepare_image(data, self.cfg, content_type)
        stem = cache_stem(link)
        name = stem + prepared.ext
        _atomic_write(self.files_dir, name, prepared.data)
        previous = self.existing.get(stem)
        if previous is not None and previous != name:
            (self.files_dir / previous).unlink(missing_ok=True)
        self.existing[stem] = name
        return self.path_of(name), len(prepared.data)

    def journal(self, record: LinkRecord) -> None:
        """Append a valid image's row right after its file landed (what a restart trusts)."""
        if self._journal is None:
            fresh = not self.journal_path.exists()
            self._journal = self.journal_path.open("a", newline="", encoding="utf-8")
            if fresh:
                csv.writer(self._journal).writerow(MANIFEST_COLUMNS)
        csv.writer(self._journal).writerow(record.as_row())
        self._journal.flush()

    def close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def commit(self, records: Iterable[LinkRecord]) -> Path:
        """Write the manifest of a completed run, then drop the journal it supersedes."""
        self.close_journal()
        path = write_manifest(self.manifest_path, records)
        self.journal_path.unlink(missing_ok=True)
        return path


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


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


class _Fetcher:
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
            connector=connector, timeout=timeout, headers={"User-Agent": _USER_AGENT}
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
    cfg: FetchConfig = DEFAULT_FETCH,
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

    fetcher = _Fetcher(cache, cfg, done)
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


# ---------------------------------------------------------------------------------------------
# Serving: one image from a link or base64, never raising
# ---------------------------------------------------------------------------------------------


def _b64_bytes(text: str, cfg: FetchConfig) -> bytes | None:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) * 3 // 4 > cfg.max_bytes:
        return None
    return base64.b64decode(text, validate=False)


def _http_bytes(url: str, cfg: FetchConfig) -> bytes | None:
    """One GET with the fetch timeouts: serving answers a request now, so no retry loop."""
    import requests

    with requests.get(
        url,
        timeout=(cfg.connect_timeout, cfg.read_timeout),
        stream=True,
        headers={"User-Agent": _USER_AGENT},
    ) as response:
        if response.status_code != 200:
            return None
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(1 << 16):
            size += len(chunk)
            if size > cfg.max_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)


def load_image_source(
    link: str | None = None, b64: str | None = None, cfg: FetchConfig = DEFAULT_FETCH
) -> Image.Image | None:
    """The image a serving row refers to, prepared exactly as the training cache would hold it
    (same validation, same downscale and re-encoding), or None when absent or broken.

    Never raises: a missing or broken image sends the row down the text-only path, as in
    training. `b64` wins over `link` when both are given (the bytes are already here).
    """
    try:
        data: bytes | None = None
        if isinstance(b64, str) and b64.strip():
            data = _b64_bytes(b64.strip(), cfg)
        elif isinstance(link, str) and link.strip():
            link = link.strip()
            if link_kind(link) == "http":
                data = _http_bytes(link, cfg)
            else:
                path = local_path(link)
                data = path.read_bytes() if path.stat().st_size <= cfg.max_bytes else None
        if not data:
            return None
        prepared = prepare_image(data, cfg)
        image = Image.open(io.BytesIO(prepared.data))
        image.load()
        return image
    except Exception as exc:  # the contract: never raise, fall back to text-only
        log.debug("image source unusable (%s): %s", link or "b64", exc)
        return None


__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_FETCH",
    "STATUSES",
    "FetchResult",
    "ImageCache",
    "ImageRejected",
    "LinkRecord",
    "PreparedImage",
    "backoff_delay",
    "cache_stem",
    "distinct_links",
    "fetch_images",
    "link_kind",
    "load_image_source",
    "local_path",
    "parse_retry_after",
    "prepare_image",
    "read_manifest",
    "validate_image",
    "write_manifest",
]
