"""Time image validation (`validate_image`, `prepare_image`) per image, decompression bombs
included.

    python benchmarks/image_validation.py            # real product images when present
    python benchmarks/image_validation.py --repeat 50
    python benchmarks/image_validation.py --results   # also docs/results/image_validation.json

tests/unit/test_images_validate.py checks that a bomb is rejected from its header without
decoding (it fails if PIL's load() is reached); this prints how long each case takes: a bomb
should cost well under a millisecond, a full decode of a product photo a few. Figures depend on
the machine and its load; not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import add_results_option, table, write_results  # noqa: E402

from pricefuse.core.config import load_params  # noqa: E402
from pricefuse.data.images import ImageRejected, prepare_image, validate_image  # noqa: E402
from tests.unit.test_images_validate import png_bomb  # noqa: E402  (the test's own bomb)

REAL_IMAGES = ROOT.parent / "shared" / "data" / "amazon2025" / "images"


def noisy_jpeg(size: tuple[int, int]) -> bytes:
    raw = random.Random(0).randbytes(size[0] * size[1] * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", size, raw).save(out, format="JPEG", quality=90)
    return out.getvalue()


def per_call_ms(call: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        with contextlib.suppress(ImageRejected):  # a bomb's verdict
            call()
        best = min(best, time.perf_counter() - started)
    return 1000 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="best of this many calls")
    add_results_option(parser, "image_validation")
    args = parser.parse_args()
    fetch = load_params(ROOT / "params.yaml").fetch
    limits = replace(fetch, max_pixels=40_000_000)
    real = sorted(REAL_IMAGES.glob("*.jpg"))[:1] if REAL_IMAGES.is_dir() else []
    cases: dict[str, Callable[[], object]] = {}
    if real:
        data = real[0].read_bytes()
        label = f"validate a real product photo ({len(data) // 1024} KiB)"
        cases[label] = lambda: validate_image(data, fetch)
    small, large = noisy_jpeg((320, 200)), noisy_jpeg((2000, 1500))
    cases["validate noisy JPEG 320x200"] = lambda: validate_image(small, fetch)
    cases["validate noisy JPEG 2000x1500"] = lambda: validate_image(large, fetch)
    cases["prepare (downscale) 2000x1500 -> 384"] = lambda: prepare_image(large, fetch)
    for side in (8_000, 30_000):
        bomb = png_bomb(side, side)
        cases[f"reject PNG bomb {side}x{side}"] = lambda bomb=bomb: validate_image(bomb, limits)
    rows = []
    for label, call in cases.items():
        rows.append([label, per_call_ms(call, args.repeat)])
        print(f"{label:<40} {rows[-1][1]:8.2f} ms", flush=True)
    if args.results:
        title = f"Image validation per call, best of {args.repeat} calls"
        write_results(args.results, [table(title, ["case", "ms"], rows, formats=[None, ".2f"])])


if __name__ == "__main__":
    main()
