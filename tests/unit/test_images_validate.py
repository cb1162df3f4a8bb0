"""Image validation, downscaling, the cache's resume rules and the serving loader, on real bytes
and real files (no network: links here are paths and file:// URLs)."""

from __future__ import annotations

import base64
import csv
import email.utils
import io
import random
import shutil
import struct
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from pricefuse.core.config import FetchConfig
from pricefuse.core.layout import MANIFEST_COLUMNS
from pricefuse.data.images import (
    ImagePolicy,
    ImageRejected,
    backoff_delay,
    cache_stem,
    distinct_links,
    fetch_images,
    load_image_source,
    parse_retry_after,
    prepare_image,
    read_manifest,
    validate_image,
)
from tests.support import project_params

FETCH = project_params().fetch


def fetch_config(**changes: object) -> FetchConfig:
    """params.yaml's fetch section with `changes`."""
    return replace(FETCH, **changes)


CFG = fetch_config(max_side=0)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def photo(size: tuple[int, int] = (320, 200), mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A noisy image, so JPEG data spreads over the whole stream (a flat one compresses away)."""
    rng = random.Random(seed)
    raw = rng.randbytes(size[0] * size[1] * 3)
    return Image.frombytes("RGB", size, raw).convert(mode)


def png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode(photo(), "JPEG", quality=90)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_valid_images_are_kept_byte_identical(fmt: str) -> None:
    data = encode(photo(mode="P" if fmt == "GIF" else "RGB"), fmt)
    prepared = prepare_image(data, fetch_config(max_side=384))
    assert prepared.data == data
    assert prepared.size == (320, 200) and not prepared.downscaled


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9, 0.99])
def test_truncated_jpeg_is_rejected_though_its_header_opens(jpeg: bytes, fraction: float) -> None:
    cut = jpeg[: int(len(jpeg) * fraction)]
    assert Image.open(io.BytesIO(cut)).size == (320, 200)  # the header alone looks fine
    with pytest.raises(ImageRejected) as info:
        validate_image(cut, CFG)
    assert info.value.kind == "undecodable"
    with pytest.raises(ImageRejected):
        prepare_image(cut, fetch_config(max_side=64))  # the downscale path decodes it all too


def test_truncated_png_is_rejected() -> None:
    data = encode(photo(), "PNG")
    with pytest.raises(ImageRejected) as info:
        validate_image(data[: len(data) * 2 // 3], CFG)
    assert info.value.kind == "undecodable"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<!DOCTYPE html><html><body>Robot Check</body></html>", "HTML page"),
        (b"  \n<html><head></head></html>", "HTML page"),
        (b'{"error": "throttled"}', "not an image"),
        (b"", "empty body"),
    ],
)
def test_non_images_are_rejected_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(ImageRejected) as info:
        validate_image(body, CFG)
    assert info.value.kind == "not_image"
    assert message in str(info.value)


def test_formats_outside_the_allow_list_are_not_decoded() -> None:
    ppm = encode(photo(), "PPM")  # PIL reads it, but product images never are PPM
    assert Image.open(io.BytesIO(ppm)).format == "PPM"
    with pytest.raises(ImageRejected) as info:
        validate_image(ppm, CFG)
    assert info.value.kind == "not_image"


@pytest.mark.parametrize("side", [8_000, 30_000])
def test_decompression_bombs_are_rejected_before_decoding(
    side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []

    def no_load(image: Image.Image) -> None:
        loads.append(f"{image.format} {image.size}")
        raise AssertionError("decoded a decompression bomb")

    # Decoding (and allocating the pixels) goes through load(); the header is all it may read.
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    monkeypatch.setattr(Image.Image, "load", no_load)
    with pytest.raises(ImageRejected) as info:
        validate_image(png_bomb(side, side), fetch_config(max_pixels=40_000_000))
    assert info.value.kind == "too_many_pixels"
    assert "max_pixels" in str(info.value)
    assert loads == []


def test_max_bytes_and_max_pixels_apply(jpeg: bytes) -> None:
    with pytest.raises(ImageRejected) as info:
        validate_image(jpeg, fetch_config(max_bytes=len(jpeg) - 1))
    assert info.value.kind == "too_large"
    with pytest.raises(ImageRejected) as info:
        validate_image(jpeg, fetch_config(max_pixels=320 * 200 - 1))
    assert info.value.kind == "too_many_pixels"
    assert validate_image(jpeg, fetch_config(max_bytes=len(jpeg), max_pixels=320 * 200)) == "JPEG"


# --- downscale --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [((800, 400), (200, 100)), ((300, 900), (67, 200)), ((640, 640), (200, 200))],
)
def test_jpeg_downscale_keeps_aspect_and_format(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    prepared = prepare_image(encode(photo(size), "JPEG"), fetch_config(max_side=200))
    image = Image.open(io.BytesIO(prepared.data))
    assert image.format == "JPEG" and prepared.ext == ".jpg"
    assert image.size == prepared.size == expected
    assert prepared.source_size == size and prepared.downscaled


def test_downscale_of_palette_and_alpha_images_becomes_png() -> None:
    rgba = photo((500, 250), mode="RGBA")
    rgba.putalpha(128)
    for source in (encode(rgba, "PNG"), encode(photo((500, 250), mode="P"), "GIF")):
        prepared = prepare_image(source, fetch_config(max_side=100))
        image = Image.open(io.BytesIO(prepared.data))
        assert (image.format, image.size, prepared.ext) == ("PNG", (100, 50), ".png")
    assert (
        Image.open(
            io.BytesIO(prepare_image(encode(rgba, "PNG"), fetch_config(max_side=100)).data)
        ).mode
        == "RGBA"
    )


# --- small pure helpers -----------------------------------------------------------------------


def test_retry_after_parses_seconds_and_dates() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31  # type: ignore[operator]
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    cfg = fetch_config(backoff_base=0.5, backoff_max=3.0)
    rng = random.Random(0)
    for attempt, step in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        delays = [backoff_delay(attempt, cfg, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 4  # jittered, not lockstep


def test_distinct_links_skip_blanks_and_keep_first_seen_order() -> None:
    links, skipped = distinct_links(["b.jpg", float("nan"), "a.jpg", None, "", "  ", "b.jpg", 7])
    assert links == ["b.jpg", "a.jpg"]
    assert skipped == 5


def test_read_manifest_ignores_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.csv"
    path.write_text(
        ",".join(MANIFEST_COLUMNS) + "\n"
        "a.jpg,data/images/files/x.jpg,ok,120,1,\n"
        "b.jpg,data/images/files/y.jpg,ok,1"  # killed mid-write
    )
    assert list(read_manifest(path)) == ["a.jpg"]


# --- fetching local files: manifest and resume rules -------------------------------------------


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with demo-like image links: relative paths, some missing or corrupt."""
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "data/raw/demo/images"
    images.mkdir(parents=True)
    for i in range(6):
        (images / f"{i}.jpg").write_bytes(encode(photo((120 + 40 * i, 160), seed=i), "JPEG"))
    (images / "corrupt.jpg").write_bytes((images / "0.jpg").read_bytes()[:700])
    return tmp_path


def manifest_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_local_links_end_in_one_manifest_row_each(project: Path) -> None:
    absolute = (project / "data/raw/demo/images/1.jpg").as_uri()
    links = [
        "data/raw/demo/images/0.jpg",
        absolute,
        "data/raw/demo/images/missing.jpg",
        "data/raw/demo/images/corrupt.jpg",
        float("nan"),
        "data/raw/demo/images/0.jpg",
    ]
    result = fetch_images(links, "data/images", CFG)
    assert result.skipped == 1
    assert [r.status for r in result.records] == ["ok", "ok", "missing", "bad"]
    ok = result.records[0]
    assert ok.path == f"data/images/files/{cache_stem(ok.link)}.jpg"  # relative to the cwd
    assert Path(ok.path).read_bytes() == Path(ok.link).read_bytes()
    assert ok.bytes == Path(ok.path).stat().st_size and ok.attempts == 1
    rows = manifest_rows(project / "data/images/manifest.csv")
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert [row["link"] for row in rows] == [r.link for r in result.records]
    assert rows[3]["path"] == "" and "undecodable" in rows[3]["error"]
    assert not (project / "data/images/journal.csv").exists()


def test_second_run_trusts_valid_files_and_retries_the_rest(project: Path) -> None:
    links = [f"data/raw/demo/images/{i}.jpg" for i in range(6)] + ["data/raw/demo/images/x.jpg"]
    first = fetch_images(links, "data/images", CFG)
    assert first.counts == {"ok": 6, "cached": 0, "missing": 1, "bad": 0, "failed": 0}
    (project / "data/raw/demo/images/x.jpg").write_bytes(encode(photo(seed=9), "PNG"))
    for i in range(3):  # sources gone: a cached link must not be read again
        (project / f"data/raw/demo/images/{i}.jpg").unlink()
    second = fetch_images(links, "data/images", CFG)
    assert [r.status for r in second.records] == ["cached"] * 6 + ["ok"]
    assert second.records[-1].path.endswith(".png")


def test_a_cache_file_of_the_wrong_size_is_fetched_again(project: Path) -> None:
    link = "data/raw/demo/images/2.jpg"
    path = Path(fetch_images([link], "data/images", CFG).records[0].path)
    path.write_bytes(path.read_bytes()[:-10])  # e.g. a short file after a power loss
    shutil.rmtree(project / "data/images/shards")  # else repaired from it (test_image_shards.py)
    again = fetch_images([link], "data/images", CFG).records[0]
    assert again.status == "ok"
    assert Path(again.path).read_bytes() == Path(link).read_bytes()


def test_unrecorded_files_are_verified_not_refetched_and_parts_removed(project: Path) -> None:
    """A kill between rename and journal write leaves a valid file no row vouches for."""
    links = [f"data/raw/demo/images/{i}.jpg" for i in range(3)]
    fetch_images(links, "data/images", CFG)
    files = project / "data/images/files"
    (project / "data/images/manifest.csv").unlink()
    shutil.rmtree(project / "data/images/shards")  # a killed first run packed nothing
    (files / f"{cache_stem(links[1])}.jpg").write_bytes(b"\xff\xd8 partial")  # not by us
    (files / ".leftover.jpg.1234.part").write_bytes(b"half")
    (project / links[0]).unlink()  # only the cache file can make this one valid
    result = fetch_images(links, "data/images", CFG)
    assert [r.status for r in result.records] == ["cached", "ok", "cached"]
    assert not list(files.glob("*.part")) and not list(files.glob(".*"))


def test_changing_max_side_rebuilds_the_cache(project: Path) -> None:
    link = "data/raw/demo/images/5.jpg"  # 320 x 160
    assert fetch_images([link], "data/images", CFG).records[0].status == "ok"
    small = fetch_images([link], "data/images", fetch_config(max_side=80)).records[0]
    assert small.status == "ok"
    assert Image.open(small.path).size == (80, 40)
    assert len(list((project / "data/images/files").iterdir())) == 1


# --- serving ----------------------------------------------------------------------------------


def local_policy(cfg: FetchConfig) -> ImagePolicy:
    """The serving policy of the demo: local images allowed, no network hosts."""
    serving = project_params(serving={"allow_local_images": True, "image_hosts": []}).serving
    return ImagePolicy.from_config(serving, cfg)


def test_load_image_source_matches_the_cache_and_never_raises(project: Path) -> None:
    cfg = fetch_config(max_side=100)
    policy = local_policy(cfg)
    link = "data/raw/demo/images/5.jpg"
    cached = Image.open(fetch_images([link], "data/images", cfg).records[0].path)
    data = Path(link).read_bytes()
    for outcome in (
        load_image_source(link, policy=policy),
        load_image_source((project / link).as_uri(), policy=policy),
        load_image_source(b64=base64.b64encode(data).decode(), policy=policy),
        load_image_source(
            b64="data:image/jpeg;base64," + base64.b64encode(data).decode(), policy=policy
        ),
    ):
        assert outcome.used and outcome.status == "ok"
        assert outcome.image.size == cached.size == (100, 50)
        assert list(outcome.image.getdata()) == list(cached.getdata())  # as training saw
    quick = local_policy(fetch_config(connect_timeout=0.5))
    for broken, status in (
        ({}, "no_image"),
        ({"link": ""}, "no_image"),
        ({"link": "data/raw/demo/images/nope.jpg"}, "file_not_found"),
        ({"link": "data/raw/demo/images/corrupt.jpg"}, "undecodable"),
        ({"link": "data/raw"}, "not_a_file"),
        ({"link": "/dev/zero"}, "not_a_file"),  # stat size 0, endless: never read
        ({"b64": "!!! not base64 !!!"}, "bad_base64"),
        ({"b64": base64.b64encode(b"<html></html>").decode()}, "not_an_image"),
        ({"link": "http://127.0.0.1:9/closed-port.jpg"}, "host_not_allowed"),
        ({"link": "ftp://example.invalid/x.jpg"}, "scheme_refused"),
    ):
        outcome = load_image_source(**broken, policy=quick)
        assert (outcome.image, outcome.status) == (None, status), broken
