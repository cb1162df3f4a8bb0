"""The image cache's tar shards: what DVC moves instead of one file per image
(pricefuse.core.image_shards), and the fetch cache that packs and restores them."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pricefuse.core.image_shards import (
    N_SHARDS,
    pack,
    restore_image_files,
    shard_name,
    unpack,
)
from pricefuse.data.images import ImageCache, fetch_images, read_manifest
from tests.support import REPO_ROOT, project_params

CFG = project_params().fetch


def name_of(i: int) -> str:
    return f"{i:024x}.jpg"


def make_files(directory: Path, count: int, start: int = 0) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(start, start + count):
        name, data = name_of(i), f"image {i} ".encode() * (i + 1)
        (directory / name).write_bytes(data)
        os.utime(directory / name, (1_700_000_000 + i, 1_700_000_000 + i))
        files[name] = data
    return files


def test_shard_name_is_stable_and_in_range() -> None:
    names = [name_of(i) for i in range(2000)]
    shards = {shard_name(name) for name in names}
    assert shard_name(names[7]) == shard_name(names[7])
    assert all(s.endswith(".tar") and 0 <= int(s[:-4]) < N_SHARDS for s in shards)
    assert len(shards) > N_SHARDS * 0.9  # spread over (nearly) every shard
    assert {shard_name(name, 1) for name in names} == {"0.tar"}
    with pytest.raises(ValueError, match="n_shards"):
        shard_name("a.jpg", 0)


def test_pack_then_unpack_restores_bytes_and_mtimes(tmp_path: Path) -> None:
    files = make_files(tmp_path / "files", 40)
    result = pack(tmp_path / "files", tmp_path / "shards", files, n_shards=8)
    assert (result.written, result.kept, result.removed, result.members) == (8, 0, 0, 40)
    assert result.bytes == sum(map(len, files.values()))
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 8
    with tarfile.open(tmp_path / "shards" / shard_name(name_of(3), 8)) as archive:
        assert name_of(3) in archive.getnames()

    restored = unpack(tmp_path / "shards", tmp_path / "fresh")
    assert (restored.restored, restored.present, restored.skipped_shards) == (40, 0, 0)
    for name, data in files.items():
        assert (tmp_path / "fresh" / name).read_bytes() == data
        source, copy = (tmp_path / "files" / name).stat(), (tmp_path / "fresh" / name).stat()
        assert int(copy.st_mtime) == int(source.st_mtime)
    assert not [p for p in (tmp_path / "fresh").iterdir() if p.name.startswith(".")]

    again = unpack(tmp_path / "shards", tmp_path / "fresh")  # nothing missing: nothing written
    assert (again.restored, again.present) == (0, 40)
    # what was unpacked packs to the same shards: a pulled cache re-uploads nothing
    repacked = pack(tmp_path / "fresh", tmp_path / "shards", files, n_shards=8)
    assert (repacked.written, repacked.kept) == (0, 8)


def test_pack_rewrites_only_changed_shards_by_rename(tmp_path: Path) -> None:
    files_dir, shards_dir = tmp_path / "files", tmp_path / "shards"
    files = make_files(files_dir, 30)
    pack(files_dir, shards_dir, files, n_shards=6)
    before = {p.name: p.stat().st_ino for p in shards_dir.iterdir()}
    # a DVC cache hardlinked to a shard must never see it change
    changed = shard_name(name_of(30), 6)
    os.link(shards_dir / changed, tmp_path / "dvc-cache-link")
    linked_bytes = (tmp_path / "dvc-cache-link").read_bytes()

    files |= make_files(files_dir, 1, start=30)
    result = pack(files_dir, shards_dir, files, n_shards=6)
    assert (result.written, result.kept, result.removed) == (1, 5, 0)
    after = {p.name: p.stat().st_ino for p in shards_dir.iterdir()}
    assert {n for n in after if after[n] != before[n]} == {changed}
    assert (tmp_path / "dvc-cache-link").read_bytes() == linked_bytes

    # a file rewritten with another size is repacked; a shard left without images is deleted
    name = name_of(4)
    (files_dir / name).write_bytes(b"re-fetched")
    assert pack(files_dir, shards_dir, files, n_shards=6).written == 1
    only = [n for n in files if shard_name(n, 6) == shard_name(name, 6)]
    result = pack(files_dir, shards_dir, [n for n in files if n not in only], n_shards=6)
    assert result.removed == 1 and not (shards_dir / shard_name(name, 6)).exists()


def test_pack_refuses_missing_files_and_clears_leftovers(tmp_path: Path) -> None:
    files = make_files(tmp_path / "files", 3)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".0.tar.1234.part").write_bytes(b"half a shard")
    pack(tmp_path / "files", tmp_path / "shards", files, n_shards=2)
    assert not list((tmp_path / "shards").glob("*.part"))
    with pytest.raises(FileNotFoundError):
        pack(tmp_path / "files", tmp_path / "shards", [*files, "absent.jpg"], n_shards=2)
    with pytest.raises(ValueError, match="not a cache file name"):
        pack(tmp_path / "files", tmp_path / "shards", ["../escape.jpg"], n_shards=2)


def test_unpack_replaces_stale_files_and_leaves_others_alone(tmp_path: Path) -> None:
    files_dir, shards_dir = tmp_path / "files", tmp_path / "shards"
    files = make_files(files_dir, 5)
    pack(files_dir, shards_dir, files, n_shards=2)
    names = sorted(files)
    (files_dir / names[0]).write_bytes(b"an older cache's file")  # other size
    os.utime(files_dir / names[1], (1_600_000_000, 1_600_000_000))  # same size, other mtime
    (files_dir / names[2]).unlink()
    (files_dir / "unpacked-by-nobody.jpg").write_bytes(b"journaled, not packed yet")

    result = unpack(shards_dir, files_dir)
    assert (result.restored, result.present) == (3, 2)
    assert all((files_dir / name).read_bytes() == files[name] for name in names)
    assert (files_dir / "unpacked-by-nobody.jpg").read_bytes() == b"journaled, not packed yet"


def test_unpack_skips_unsafe_members_and_unreadable_shards(tmp_path: Path) -> None:
    shards_dir = tmp_path / "shards"
    shards_dir.mkdir()
    with tarfile.open(shards_dir / "0.tar", "w:") as archive:
        for name, data in (("../escape.jpg", b"x"), (".hidden.jpg", b"y"), ("good.jpg", b"z")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    (shards_dir / "1.tar").write_bytes(b"not a tar file at all" * 100)
    good = make_files(tmp_path / "src", 2)
    pack(tmp_path / "src", tmp_path / "more", good, n_shards=1)
    full = (tmp_path / "more" / "0.tar").read_bytes()
    (shards_dir / "2.tar").write_bytes(full[: len(full) // 2])  # cut short: a partial download

    result = unpack(shards_dir, tmp_path / "files")
    assert result.skipped_shards >= 1
    written = sorted(p.name for p in (tmp_path / "files").iterdir())
    assert "good.jpg" in written
    assert not {"link.jpg", ".hidden.jpg"} & set(written)
    assert not (tmp_path / "escape.jpg").exists()
    for name in written:  # whatever came out of the cut shard is whole
        if name in good:
            assert (tmp_path / "files" / name).read_bytes() == good[name]
    assert not [p for p in (tmp_path / "files").iterdir() if p.name.endswith(".part")]


# --- the fetch cache --------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "data/raw/demo/images"
    images.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (60 + 10 * i, 40), (40 * i, 90, 200 - 30 * i)).save(images / f"{i}.jpg")
    return tmp_path


LINKS = [f"data/raw/demo/images/{i}.jpg" for i in range(5)] + ["data/raw/demo/images/gone.jpg"]


def pulled_copy(project: Path) -> None:
    """What a teammate's `dvc pull` leaves: the cache without files/ (.dvcignore keeps it out)."""
    shutil.rmtree(project / "data/images/files")


def test_a_completed_fetch_packs_what_the_manifest_vouches_for(project: Path) -> None:
    result = fetch_images(LINKS, "data/images", CFG)
    assert result.counts["ok"] == 5 and result.counts["missing"] == 1
    packed = set()
    for shard in (project / "data/images/shards").glob("*.tar"):
        with tarfile.open(shard) as archive:
            packed |= set(archive.getnames())
    assert packed == {Path(r.path).name for r in result.records if r.path}


def test_a_pulled_cache_resumes_from_its_shards_without_fetching(project: Path) -> None:
    first = fetch_images(LINKS, "data/images", CFG)
    cached = {r.link: Path(r.path).read_bytes() for r in first.records if r.path}
    pulled_copy(project)
    for i in range(5):  # the sources are gone: only the shards can make these cached
        (project / f"data/raw/demo/images/{i}.jpg").unlink()
    second = fetch_images(LINKS, "data/images", CFG)
    assert [r.status for r in second.records] == ["cached"] * 5 + ["missing"]
    assert second.bytes_fetched == 0
    assert {r.link: Path(r.path).read_bytes() for r in second.records if r.path} == cached
    rows = read_manifest(project / "data/images/manifest.csv")  # one status per link, as before
    assert [rows[link].status for link in LINKS] == ["cached"] * 5 + ["missing"]


def test_readers_restore_the_files_of_a_pulled_cache(project: Path) -> None:
    first = fetch_images(LINKS, "data/images", CFG)
    wanted = {r.path: Path(r.path).read_bytes() for r in first.records if r.path}
    pulled_copy(project)
    assert restore_image_files("data/images").restored == 5
    assert {path: Path(path).read_bytes() for path in wanted} == wanted


def test_a_short_file_is_repaired_from_its_shard(project: Path) -> None:
    link = LINKS[2]
    path = Path(fetch_images([link], "data/images", CFG).records[0].path)
    good = path.read_bytes()
    path.write_bytes(good[:-10])  # e.g. a short file after a power loss
    (project / link).unlink()
    again = fetch_images([link], "data/images", CFG).records[0]
    assert again.status == "cached" and path.read_bytes() == good


def test_changing_max_side_clears_the_shards_too(project: Path) -> None:
    """Else a run killed after the change would restore old-size images that the old manifest
    still vouches for."""
    fetch_images(LINKS[:3], "data/images", CFG)
    shard = next((project / "data/images/shards").glob("*.tar"))
    os.replace(shard, project / "dvc-cache-object")  # DVC's symlink cache type
    shard.symlink_to(project / "dvc-cache-object")
    small = project_params(fetch={"max_side": 20}).fetch
    ImageCache("data/images", small)  # opened with new settings, then killed before commit
    assert not list((project / "data/images/shards").iterdir())
    assert (project / "dvc-cache-object").is_file()
    reopened = ImageCache("data/images", small)
    assert not list((project / "data/images/files").iterdir())
    assert all(reopened.trusted(link) is None for link in LINKS[:3])


def test_dvcignore_leaves_out_the_files_of_the_configured_cache() -> None:
    """The stage's DVC output is the cache without files/: the pattern must name the param."""
    images_dir = project_params().data.images_dir.strip("/")
    lines = (REPO_ROOT / ".dvcignore").read_text().splitlines()
    assert f"/{images_dir}/files/" in lines
