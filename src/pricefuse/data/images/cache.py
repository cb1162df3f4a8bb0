"""The image cache directory: its layout, atomic writes, the journal and the manifest.

Cache layout under `cache_dir` (= `params.data.images_dir`):
- `files/<stem><ext>`: one file per link; `stem` is a hash of the link, so a link always maps to
  the same file and a restart can find it without any bookkeeping.
- `manifest.csv`: the last completed run (`layout.MANIFEST_COLUMNS`), written atomically.
- `journal.csv`: the same rows, appended as images land, so a run killed with `kill -9` resumes
  without re-downloading; merged into the manifest and removed when a run completes.
- `cache.json`: the settings that change file content (`max_side`); a change invalidates files.
- `shards/`: the valid files packed into tar shards when a run completes
  (pricefuse.core.image_shards): what DVC tracks and moves instead of `files/`, which
  `.dvcignore` leaves out. Opening the cache first restores `files/` from them (a fresh
  `dvc pull`), so a pulled cache resumes like a local one.

The fast resume check trusts a file only when a manifest/journal row says it is valid *and* its
size matches; a file without such a row (a crash between rename and journal write) is decoded
once more instead of being downloaded again.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from pricefuse.core.config import FetchConfig
from pricefuse.core.image_shards import FILES_DIR, SHARDS_DIR, pack, restore_image_files
from pricefuse.core.layout import IMAGE_OK_STATUSES, MANIFEST_COLUMNS, image_manifest
from pricefuse.data.images.records import STATUSES, LinkRecord
from pricefuse.data.images.validate import ImageRejected, prepare_image, validate_image

log = logging.getLogger(__name__)

# Bump when the bytes written for the same input and settings change (invalidates caches).
_CACHE_FORMAT = 1
_STEM_CHARS = 24
_JOURNAL = "journal.csv"
_SETTINGS = "cache.json"
_PART_SUFFIX = ".part"


def cache_stem(link: str) -> str:
    """Deterministic file stem of a link: the same link always maps to the same cache file."""
    return hashlib.sha1(link.encode("utf-8")).hexdigest()[:_STEM_CHARS]


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


class ImageCache:
    """The files directory, what previous runs recorded about it, and the journal of this run.

    Opening it removes `.part` leftovers of killed runs and, when the content settings changed
    since the files were written, the files and shards themselves (they would no longer match
    the params); otherwise it restores the files the shards hold and `files/` lacks.
    """

    def __init__(self, cache_dir: Path | str, cfg: FetchConfig) -> None:
        self.root = Path(cache_dir)
        self.files_dir = self.root / FILES_DIR
        self.shards_dir = self.root / SHARDS_DIR
        # The stage contract's path, derived so that the two cannot drift apart.
        self.manifest_path = image_manifest(self.root)
        self.journal_path = self.root / _JOURNAL
        self.cfg = cfg
        self.files_dir.mkdir(parents=True, exist_ok=True)
        settings_ok = self._check_settings()
        if settings_ok:
            restore_image_files(self.root)
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
        for directory in (self.files_dir, self.shards_dir):
            if directory.is_dir():
                for entry in os.scandir(directory):
                    # a symlink too: DVC's symlink cache type checks shards out as links
                    if not entry.is_dir(follow_symlinks=False):
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
        """Write the manifest of a completed run, drop the journal it supersedes, then pack the
        files it vouches for into the shards (only the shards that changed are rewritten)."""
        self.close_journal()
        records = list(records)
        path = write_manifest(self.manifest_path, records)
        self.journal_path.unlink(missing_ok=True)
        valid = (r for r in records if r.status in IMAGE_OK_STATUSES and r.bytes > 0 and r.path)
        pack(self.files_dir, self.shards_dir, (os.path.basename(r.path) for r in valid))
        return path
