"""Benchmark `fetch_images` against a loopback server: images/s and peak memory per concurrency,
and the time of a resumed run over a complete cache.

    python benchmarks/fetch.py                      # 2,000 links at 1, 8, 32, 64; resume of 10,000
    python benchmarks/fetch.py --links 500 --concurrency 8 32 --cache-links 2000
    python benchmarks/fetch.py --results            # also write docs/results/fetch.json

Targets (issue 3, 2 shared cores): >= 300 images/s at concurrency 32; complete-cache pass over
10,000 links < 2 s. Serves the real images from ../shared/data/amazon2025/images when present
(read in place), synthetic JPEGs otherwise. Every measurement runs in a fresh subprocess, so
peak RSS is that run's own, and the server runs in another, so it does not share the GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "integration" / "faulty_server.py"
sys.path.insert(0, str(ROOT))
REAL_IMAGES = ROOT.parent / "shared" / "data" / "amazon2025" / "images"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_seconds() -> float:
    """This process's CPU time: a figure that, unlike images/s, does not move with the load
    other users put on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(port: int, links: int, concurrency: int, cache: Path) -> dict[str, float]:
    """One fetch run in this process; returns its figures."""
    from dataclasses import replace

    from pricefuse.core.config import load_params
    from pricefuse.data.images import fetch_images

    fetch = load_params(ROOT / "params.yaml").fetch
    cfg = replace(fetch, concurrency=concurrency, per_host=concurrency)
    urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(links)]
    base = _rss_mb()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    result = fetch_images(urls, cache, cfg)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    return {
        "links": links,
        "concurrency": concurrency,
        "seconds": seconds,
        "images_per_s": links / seconds,
        "cpu_ms_per_image": 1000 * cpu / links,
        **{f"n_{k}": v for k, v in result.counts.items()},
        "peak_rss_mb": _rss_mb(),
        "base_rss_mb": base,
    }


def _run_worker(port: int, links: int, concurrency: int, cache: Path) -> dict[str, float]:
    args = [sys.executable, __file__, "--worker", "--port", str(port)]
    args += ["--links", str(links), "--concurrency", str(concurrency), "--cache", str(cache)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _requests_served(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__counts", timeout=5) as response:
        return sum(json.loads(response.read()).values())


def main() -> None:
    from benchmarks.results import add_results_option, table, write_results

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--links", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--cache-links", type=int, default=10_000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    add_results_option(parser, "fetch")
    args = parser.parse_args()
    if args.worker:
        figures = worker(args.port, args.links, args.concurrency[0], args.cache)
        print(json.dumps(figures))
        return

    images = REAL_IMAGES if REAL_IMAGES.is_dir() else None
    n_routes = max(args.links, args.cache_links)
    server_args = [sys.executable, str(SERVER), "--links", str(n_routes), "--lifetime", "900"]
    if images is not None:
        server_args += ["--images", str(images)]
    server = subprocess.Popen(server_args, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])  # type: ignore[union-attr]
        source = f"real images ({images})" if images else "synthetic images"
        print(f"loopback server on port {port}, serving {source}")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine: {os.cpu_count()} cores, load average {load} (shared)")
        print(
            f"{'concurrency':>11} {'links':>6} {'seconds':>8} {'images/s':>9} "
            f"{'CPU ms/img':>10} {'peak RSS MB':>11} {'(base MB)':>9}"
        )
        rows = []
        with tempfile.TemporaryDirectory(prefix="fetch-bench-") as tmp:
            for concurrency in args.concurrency:
                cache = Path(tmp) / f"c{concurrency}"
                r = _run_worker(port, args.links, concurrency, cache)
                if r["n_ok"] != args.links:
                    raise SystemExit(f"not every image was fetched: {r}")
                print(
                    f"{concurrency:>11} {args.links:>6} {r['seconds']:>8.2f} "
                    f"{r['images_per_s']:>9.0f} {r['cpu_ms_per_image']:>10.2f} "
                    f"{r['peak_rss_mb']:>11.0f} {r['base_rss_mb']:>9.0f}"
                )
                figures = ["seconds", "images_per_s", "cpu_ms_per_image", "peak_rss_mb"]
                rows.append([concurrency, args.links, *(r[k] for k in figures), r["base_rss_mb"]])
            cache = Path(tmp) / "resume"
            fill = _run_worker(port, args.cache_links, 32, cache)
            before = _requests_served(port)
            resumed = _run_worker(port, args.cache_links, 32, cache)
            requests = _requests_served(port) - before
            if resumed["n_cached"] != args.cache_links or requests:
                raise SystemExit(f"resume re-fetched: {resumed}, {requests} requests")
            print(
                f"fill cache: {args.cache_links} links in {fill['seconds']:.1f}s "
                f"({fill['images_per_s']:.0f} images/s)"
            )
            print(
                f"resumed run over the complete cache: {args.cache_links} links in "
                f"{resumed['seconds']:.3f}s, {resumed['n_cached']} cached, {requests} requests "
                f"(peak RSS {resumed['peak_rss_mb']:.0f} MB)"
            )
        if args.results:
            kind = "real product images" if images else "synthetic JPEGs"
            columns = ["concurrency", "links", "seconds", "images/s", "CPU ms/image"]
            columns += ["peak RSS MB", "base RSS MB"]
            cache_rows = [
                [
                    "fill an empty cache",
                    fill["seconds"],
                    fill["images_per_s"],
                    None,
                ],
                ["resume over the complete cache", resumed["seconds"], None, requests],
            ]
            write_results(
                args.results,
                [
                    table(
                        f"`fetch_images` from a loopback server serving {kind}",
                        columns,
                        rows,
                        formats=[None, None, ".2f", ",.0f", ".2f", ".0f", ".0f"],
                    ),
                    table(
                        f"A resumed run: {args.cache_links:,} links, concurrency 32",
                        ["run", "seconds", "images/s", "requests sent"],
                        cache_rows,
                        formats=[None, ".3f", ",.0f", None],
                    ),
                ],
            )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
