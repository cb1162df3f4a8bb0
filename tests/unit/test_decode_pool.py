"""The decode pool on real worker processes and real images: same results as in-process, slow
decodes cut by killing their worker, a bounded number of decodes at once, dead workers replaced.

The slow image is genuine, not a sleeping stand-in: a progressive JPEG whose scans carry no data
(each is a few end-of-band runs covering the whole 40 Mpx canvas), so libjpeg walks every block
once per scan while the file stays tiny (`many_scan_jpeg`).
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from PIL import Image

from pricefuse.core.config import FetchConfig
from pricefuse.data.images.decode_pool import DecodePool, shared_pool
from pricefuse.data.images.validate import (
    MAX_JPEG_SCANS,
    ImageRejected,
    decoded_image,
    prepare_image,
)
from tests.support import many_scan_jpeg, project_params

CFG = project_params().fetch  # max_side 384, max_pixels 40 M


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def photo(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    raw = random.Random(seed).randbytes(size[0] * size[1] * 3)
    return Image.frombytes("RGB", size, raw).convert(mode)


SMALL_JPEG = encode(photo((300, 200)), "JPEG", quality=90)


# 6320^2 = 39.9 Mpx, under fetch.max_pixels; 2 KB; the most scans validation lets through
# (MAX_JPEG_SCANS): ~1.1 s of decode here, cut before that.
SLOW_JPEG = many_scan_jpeg(6320, MAX_JPEG_SCANS)


def dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def pool():
    with DecodePool(2, 10.0) as shared:
        shared.warm()
        yield shared


def test_the_slow_image_is_a_valid_image_under_the_limits() -> None:
    image = Image.open(io.BytesIO(SLOW_JPEG))
    assert (image.format, image.size) == ("JPEG", (6320, 6320))
    assert CFG.max_pixels >= 6320 * 6320 and len(SLOW_JPEG) < 50_000
    with pytest.raises(ImageRejected) as refused:  # one scan more is refused undecoded
        prepare_image(many_scan_jpeg(6320, MAX_JPEG_SCANS + 1), CFG)
    assert refused.value.kind == "too_many_scans"


IMAGES = pytest.mark.parametrize(
    "data",
    [
        encode(photo((200, 150)), "PNG"),  # kept as is
        SMALL_JPEG,
        encode(photo((1000, 700)), "JPEG", quality=85),  # downscaled, re-encoded JPEG
        encode(photo((900, 500), "RGBA"), "PNG"),  # downscaled, re-encoded PNG
        encode(photo((500, 400), "P"), "GIF"),
    ],
    ids=["png", "small-jpeg", "big-jpeg", "big-png", "gif"],
)


@IMAGES
def test_prepare_matches_prepare_image_in_process(pool: DecodePool, data: bytes) -> None:
    expected = prepare_image(data, CFG)
    got = pool.prepare(data, CFG)
    assert got == expected  # bytes, ext, size, source size and format
    assert got.downscaled == (max(expected.source_size) > CFG.max_side)


@IMAGES
def test_decode_matches_decoded_image_in_process(pool: DecodePool, data: bytes) -> None:
    expected = decoded_image(data, CFG)
    got = pool.decode(data, CFG)
    assert (got.mode, got.size) == (expected.mode, expected.size)
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    ("data", "cfg", "kind"),
    [
        (b"<!DOCTYPE html><html><body>nope</body></html>", CFG, "not_image"),
        (b"", CFG, "not_image"),
        (encode(photo((300, 300)), "PNG"), replace(CFG, max_pixels=50_000), "too_many_pixels"),
        (SMALL_JPEG[: len(SMALL_JPEG) // 2], CFG, "undecodable"),
        (SMALL_JPEG, replace(CFG, max_bytes=1000), "too_large"),
    ],
    ids=["html", "empty", "pixels", "truncated", "bytes"],
)
def test_rejections_keep_their_kind_and_message(
    pool: DecodePool, data: bytes, cfg: FetchConfig, kind: str
) -> None:
    with pytest.raises(ImageRejected) as in_process:
        prepare_image(data, cfg)
    pids = pool.pids()
    with pytest.raises(ImageRejected) as pooled:
        pool.prepare(data, cfg)
    assert (pooled.value.kind, str(pooled.value)) == (kind, str(in_process.value))
    with pytest.raises(ImageRejected) as decoded:
        pool.decode(data, cfg)
    assert (decoded.value.kind, str(decoded.value)) == (kind, str(in_process.value))
    assert pool.pids() == pids  # a rejection is an answer, not a reason to replace the worker


def test_many_threads_share_the_workers(pool: DecodePool) -> None:
    images = [encode(photo((600, 450), seed=seed), "JPEG") for seed in range(8)]
    results: dict[int, object] = {}

    def work(index: int) -> None:
        results[index] = pool.prepare(images[index], CFG)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {i: prepare_image(data, CFG) for i, data in enumerate(images)}
    assert len(pool.pids()) == 2 and pool.idle() == 2


@pytest.mark.parametrize(("seconds", "within"), [(0.5, None), (30.0, 0.5)])
def test_a_slow_decode_is_cut_and_its_worker_replaced(seconds: float, within: float | None) -> None:
    """Cut at `seconds`, or at the caller's deadline when that comes first."""
    with DecodePool(1, seconds) as pool:
        pool.warm()
        [before] = pool.pids()
        start = time.monotonic()
        deadline = None if within is None else start + within
        with pytest.raises(ImageRejected) as cut:
            pool.prepare(SLOW_JPEG, CFG, deadline=deadline)
        elapsed = time.monotonic() - start
        assert cut.value.kind == "decode_timeout", cut.value
        assert 0.45 <= elapsed < 0.5 + 1.5, elapsed
        [after] = pool.pids()
        assert after != before and dead(before)
        assert pool.prepare(SMALL_JPEG, CFG) == prepare_image(SMALL_JPEG, CFG)
        assert pool.pids() == [after]


def test_no_free_worker_before_the_deadline_is_busy() -> None:
    with DecodePool(1, 0.8) as pool:
        pool.warm()
        outcome: list[ImageRejected] = []

        def block() -> None:
            try:
                pool.prepare(SLOW_JPEG, CFG)
            except ImageRejected as exc:
                outcome.append(exc)

        blocker = threading.Thread(target=block)
        blocker.start()
        while pool.idle():  # until the slow decode holds the only worker
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(ImageRejected) as busy:
            pool.prepare(SMALL_JPEG, CFG, deadline=start + 0.3)
        elapsed = time.monotonic() - start
        assert busy.value.kind == "decode_busy"
        assert 0.29 <= elapsed < 1.3, elapsed
        blocker.join(10)
        assert [exc.kind for exc in outcome] == ["decode_timeout"]
        assert pool.prepare(SMALL_JPEG, CFG).size == (300, 200)


def test_a_worker_killed_between_calls_is_replaced(pool: DecodePool) -> None:
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    os.waitid(os.P_PID, victim, os.WEXITED | os.WNOWAIT)  # dead (a zombie), not yet reaped
    for _ in range(3):  # whichever worker each call gets, all succeed
        assert pool.prepare(SMALL_JPEG, CFG) == prepare_image(SMALL_JPEG, CFG)
    assert victim not in pool.pids() and len(pool.pids()) == 2


def test_a_worker_dying_mid_decode_is_undecodable_and_replaced() -> None:
    """What an OOM kill looks like from the parent: the pipe closes mid-job."""
    with DecodePool(1, 30.0) as pool:
        pool.warm()
        [victim] = pool.pids()
        threading.Timer(0.3, os.kill, (victim, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(ImageRejected) as died:
            pool.decode(SLOW_JPEG, CFG)
        assert died.value.kind == "undecodable" and time.monotonic() - start < 5
        assert pool.prepare(SMALL_JPEG, CFG).size == (300, 200)
        assert pool.pids() != [victim] and dead(victim)


def test_the_memory_ceiling_turns_a_huge_decode_into_a_rejection() -> None:
    huge = encode(Image.new("RGBA", (6000, 6000), (1, 2, 3, 255)), "PNG")  # 144 MB of pixels
    with DecodePool(1, 30.0, memory_limit=150 << 20) as pool:  # a worker is ~50 MB
        with pytest.raises(ImageRejected) as rejected:
            pool.prepare(huge, CFG)
        assert rejected.value.kind == "undecodable"
        assert pool.prepare(SMALL_JPEG, CFG).size == (300, 200)


def test_close_kills_the_workers_and_refuses_new_work() -> None:
    pool = DecodePool(2, 5.0)
    pool.warm()
    pids = pool.pids()
    assert len(pids) == 2
    pool.close()
    assert pool.pids() == [] and all(dead(pid) for pid in pids)
    with pytest.raises(ImageRejected) as closed:
        pool.prepare(SMALL_JPEG, CFG)
    assert closed.value.kind == "decode_busy"


EXIT_MID_DECODE = """
import threading, time
from pricefuse.data.images.decode_pool import shared_pool
from pricefuse.data.images.validate import ImageRejected
from tests.support import many_scan_jpeg, project_params
from tests.unit.test_decode_pool import SLOW_JPEG
pool = shared_pool(2, 60.0)
pool.warm()
def request():
    try:
        pool.prepare(SLOW_JPEG, project_params().fetch)
    except ImageRejected as exc:
        assert exc.kind == "decode_busy", exc  # "shut down"
threading.Thread(target=request, daemon=True).start()
while pool.idle() == 2:
    time.sleep(0.01)
time.sleep(0.3)  # one worker decoding: it would not notice a closed pipe for seconds
print(*pool.pids(), flush=True)
"""


def test_interpreter_exit_mid_decode_leaves_no_worker() -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXIT_MID_DECODE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    assert all(dead(pid) for pid in pids)  # killed at exit, not left to finish the decode


def test_shared_pool_is_one_per_limits_and_lazy() -> None:
    first = shared_pool(2, 3.0)
    try:
        assert shared_pool(2, 3.0) is first
        assert shared_pool(1, 3.0) is not first
        assert first.pids() == []  # nothing started until the first decode
    finally:
        first.close()
        shared_pool(1, 3.0).close()
    assert shared_pool(2, 3.0) is not first  # a closed pool is not handed out again
    shared_pool(2, 3.0).close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        DecodePool(0, 1.0)
    with pytest.raises(ValueError):
        DecodePool(1, 0)
    with pytest.raises(ValueError):
        DecodePool(1, 1.0, start_method="fork")
