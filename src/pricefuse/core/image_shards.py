"""The image cache's files packed into a few hundred tar shards: the form DVC stores and moves.

Why: `dvc push` / `pull` pay a fixed cost per file (a remote request, a directory entry, a
hash-cache row), and at 150,000 images of ~20 KB that cost, not the bytes, decides how long a
teammate waits (benchmarks/dvc_images.py measures both). The fetch stage keeps working on one
file per link (`files/`: what resume, the manifest and every reader use) and packs the images
the manifest vouches for into `shards/` when a run completes (pricefuse.data.images.cache);
`.dvcignore` keeps `files/` out of DVC, so the stage's output travels as `manifest.csv`,
`cache.json` and the shards. Where the shards arrived without the files (`dvc pull` in a fresh
clone, a `dvc exp run --temp` workspace) `restore_image_files` unpacks them before a stage reads
an image (fetch_images, preprocess and embed call it).

- Each image goes to shard `sha1(name) % N_SHARDS`, a plain tar (JPEG does not compress)
  holding its bytes under its cache file name and its mtime in whole seconds.
- `pack` rewrites only the shards whose members changed (name, size or mtime) and deletes
  shards no image maps to any more, so a resumed run that added a few images re-uploads a few
  shards, not all. A shard is written to a temp file and renamed, never edited in place: a file
  DVC linked from its cache (hardlink/symlink cache types) is never modified.
- `unpack` writes, atomically, every member the files directory lacks or holds with another
  size or mtime (the shards are what DVC vouches for: a stale file of an older cache under a
  freshly pulled manifest must not pass for the pulled one), and sets the mtime from the shard,
  so the next `pack` sees nothing to rewrite. An unreadable shard is skipped with a
  warning (its links are then fetched again); a member that is not a plain file with a plain
  name is never written.

Imports nothing else of pricefuse: embed restores the files without importing the fetch code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

N_SHARDS = 256  # 150,000 images -> ~590 per shard, ~13 MB each
# The image cache directory (`data.images_dir`): one file per link, and the shards DVC tracks.
FILES_DIR = "files"
SHARDS_DIR = "shards"
SHARD_SUFFIX = ".tar"
_PART_SUFFIX = ".part"
_Entry = tuple[str, int, int]  # member name, size, mtime in whole seconds


@dataclass(frozen=True)
class PackResult:
    written: int  # shards (re)written
    kept: int  # shards already up to date
    removed: int  # shards deleted: no image maps to them any more
    members: int  # images in all shards
    bytes: int  # their total size


@dataclass(frozen=True)
class UnpackResult:
    restored: int  # files written from a shard
    present: int  # files already there with the shard's size
    skipped_shards: int  # shards that could not be read


def shard_name(file_name: str, n_shards: int = N_SHARDS) -> str:
    """The shard a cache file goes to: stable for a name whatever else is in the cache."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    width = len(str(n_shards - 1))
    digest = hashlib.sha1(file_name.encode("utf-8")).digest()
    return f"{int.from_bytes(digest[:8], 'big') % n_shards:0{width}d}{SHARD_SUFFIX}"


def _plain_name(name: str) -> bool:
    return bool(name) and name == os.path.basename(name) and not name.startswith(".")


def _shard_paths(shards_dir: Path) -> dict[str, Path]:
    """name -> path of every shard; deletes `.part` leftovers of killed runs."""
    found: dict[str, Path] = {}
    if not shards_dir.is_dir():
        return found
    for entry in os.scandir(shards_dir):
        if entry.name.endswith(_PART_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        elif entry.name.endswith(SHARD_SUFFIX) and entry.is_file(follow_symlinks=True):
            found[entry.name] = Path(entry.path)
    return found


def _members(shard: Path) -> list[_Entry] | None:
    """The shard's (name, size, mtime) list in order, or None when it cannot be read."""
    try:
        with tarfile.open(shard, mode="r:") as archive:
            return [(m.name, m.size, int(m.mtime)) for m in archive.getmembers()]
    except (OSError, tarfile.TarError):
        return None


def _write_shard(path: Path, files_dir: Path, entries: list[_Entry]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_PART_SUFFIX}")
    try:
        with tarfile.open(tmp, mode="w:", format=tarfile.USTAR_FORMAT) as archive:
            for name, size, mtime in entries:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = size, mtime, 0o644
                with (files_dir / name).open("rb") as handle:
                    archive.addfile(info, handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def pack(
    files_dir: Path | str,
    shards_dir: Path | str,
    names: Iterable[str],
    n_shards: int = N_SHARDS,
) -> PackResult:
    """Make `shards_dir` hold exactly the files `names` of `files_dir`, rewriting only the
    shards that differ. Raises FileNotFoundError for a name that is not in `files_dir`."""
    files_dir, shards_dir = Path(files_dir), Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, list[_Entry]] = {}
    total = 0
    for name in sorted(set(names)):
        if not _plain_name(name):
            raise ValueError(f"not a cache file name: {name!r}")
        stat = os.stat(files_dir / name)
        wanted.setdefault(shard_name(name, n_shards), []).append(
            (name, stat.st_size, int(stat.st_mtime))
        )
        total += stat.st_size
    existing = _shard_paths(shards_dir)
    removed = 0
    for name, path in existing.items():
        if name not in wanted:
            path.unlink(missing_ok=True)
            removed += 1
    written = kept = 0
    for name, entries in sorted(wanted.items()):
        if name in existing and _members(existing[name]) == entries:
            kept += 1
            continue
        _write_shard(shards_dir / name, files_dir, entries)
        written += 1
    members = sum(len(entries) for entries in wanted.values())
    return PackResult(written, kept, removed, members, total)


def _restore(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = archive.extractfile(member)
    if source is None:
        raise tarfile.TarError(f"{member.name}: no data")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{_PART_SUFFIX}")
    try:
        with source, tmp.open("wb") as handle:
            while chunk := source.read(1 << 20):
                handle.write(chunk)
        if tmp.stat().st_size != member.size:
            raise tarfile.TarError(f"{member.name}: truncated")
        os.utime(tmp, (member.mtime, member.mtime))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def unpack(shards_dir: Path | str, files_dir: Path | str) -> UnpackResult:
    """Write every shard member that `files_dir` lacks or holds with another size or mtime."""
    shards_dir, files_dir = Path(shards_dir), Path(files_dir)
    restored = present = skipped = 0
    shards = _shard_paths(shards_dir)
    if shards:
        files_dir.mkdir(parents=True, exist_ok=True)
    for _name, path in sorted(shards.items()):
        try:
            with tarfile.open(path, mode="r:") as archive:
                for member in archive:
                    if not member.isreg() or not _plain_name(member.name):
                        log.warning("%s: member %r is not a cache file; ignored", path, member.name)
                        continue
                    target = files_dir / member.name
                    with contextlib.suppress(OSError):
                        stat = target.stat()
                        if (stat.st_size, int(stat.st_mtime)) == (member.size, member.mtime):
                            present += 1
                            continue
                    _restore(archive, member, target)
                    restored += 1
        except (tarfile.TarError, EOFError) as exc:
            log.warning("image shard %s unreadable (%s): its images are fetched again", path, exc)
            skipped += 1
    return UnpackResult(restored, present, skipped)


def restore_image_files(images_dir: Path | str) -> UnpackResult:
    """Unpack the image cache's shards into its `files/` where they are missing (a fresh
    `dvc pull`); nothing to do (a few seconds of listing at 150,000 images) once they are there."""
    images_dir = Path(images_dir)
    result = unpack(images_dir / SHARDS_DIR, images_dir / FILES_DIR)
    if result.restored:
        log.info("restored %d image files from %s", result.restored, images_dir / SHARDS_DIR)
    return result
