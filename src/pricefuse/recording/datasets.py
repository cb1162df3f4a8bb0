"""Each stage's inputs as MLflow datasets whose digest is DVC's hash of them.

Why DVC's hash: it is the identity DVC already uses for the same bytes (dvc.lock), so an MLflow
run's "Datasets used" can be matched with `dvc.lock`, `dvc exp show` or a teammate's cache without
re-hashing anything. An input DVC has not hashed yet (a run outside `dvc repro`) gets the md5 of
its bytes, which for a file is what DVC would record (a directory: its names and sizes).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from pathlib import Path

import yaml

LOCK_FILE = Path("dvc.lock")


def lock_digests(lock_path: Path = LOCK_FILE) -> dict[str, str]:
    """path -> md5 of every dep and out recorded in dvc.lock (empty when there is none)."""
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    digests: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in [*(stage.get("deps") or []), *(stage.get("outs") or [])]:
            if entry.get("md5"):
                digests[Path(entry["path"]).as_posix()] = str(entry["md5"])
    return digests


def content_md5(path: Path) -> str:
    """md5 of a file's bytes; for a directory, of its file names and sizes (cheap on an image
    cache of 150k files; DVC's own hash is used whenever dvc.lock has one)."""
    digest = hashlib.md5()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}:{file.stat().st_size}\n".encode())
        return digest.hexdigest()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_digest(path: Path, digests: dict[str, str]) -> str:
    """DVC's hash of `path` from dvc.lock, else the md5 of its content."""
    return digests.get(Path(path).as_posix()) or content_md5(Path(path))


def log_inputs(paths: Iterable[Path | str], lock_path: Path = LOCK_FILE) -> dict[str, str]:
    """Log each existing input as an MLflow dataset of the active run; returns path -> digest."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    digests = lock_digests(lock_path)
    logged: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            continue
        digest = input_digest(path, digests)
        with warnings.catch_warnings():  # two equivalent local-file sources match: either does
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path.resolve()))
        mlflow.log_input(MetaDataset(source, name=path.as_posix(), digest=digest))
        logged[path.as_posix()] = digest
    return logged
