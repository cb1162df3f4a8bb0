"""Time `fetch_images` over links to a host that refuses connections, with and without the
host-down breaker (`fetch.host_fail_threshold`).

    python benchmarks/fetch_unreachable.py                 # 40 dead links, 5 retries
    python benchmarks/fetch_unreachable.py --links 200 --retries 3
    python benchmarks/fetch_unreachable.py --results      # docs/results/fetch_unreachable.json

tests/integration/test_fetch_faults.py checks what the breaker does (each dead link fails as
"host unreachable", a handful of attempts in all); this prints what it saves: seconds and
attempts for the same links with the breaker on (threshold 3) and off. Measured on 2 shared
cores: 40 links, breaker on 0.3 s (8 attempts), off 19.7 s (240 attempts). Figures depend on the
machine and its load; not a test.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pricefuse.core.config import FetchConfig, load_params
from pricefuse.data.images import fetch_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import add_results_option, table, write_results

# The integration test's settings: small timeouts and backoffs, the production logic.
BASE = replace(
    load_params(Path(__file__).resolve().parents[1] / "params.yaml").fetch,
    concurrency=8,
    per_host=8,
    connect_timeout=1.0,
    read_timeout=0.5,
    retries=5,
    backoff_base=0.2,
    backoff_max=2.0,
    max_side=0,
    host_fail_threshold=3,
)


def closed_port() -> int:
    """A loopback port nobody listens on: connections are refused at once, as offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(links: list[str], cfg: FetchConfig) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        result = fetch_images(links, Path(cache), cfg)
        seconds = time.perf_counter() - started
    assert all(r.status == "failed" for r in result.records)
    return seconds, sum(r.attempts for r in result.records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", type=int, default=40)
    parser.add_argument("--retries", type=int, default=BASE.retries)
    add_results_option(parser, "fetch_unreachable")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    dead = f"http://127.0.0.1:{closed_port()}"
    links = [f"{dead}/img/{i}.jpg" for i in range(args.links)]
    base = replace(BASE, retries=args.retries)
    never = args.links * (args.retries + 1) + 1
    print(f"{args.links} links to {dead} (connection refused), {args.retries} retries")
    rows = []
    for label, cfg in [
        (f"breaker on (threshold {base.host_fail_threshold})", base),
        ("breaker off", replace(base, host_fail_threshold=never)),
    ]:
        seconds, attempts = run(links, cfg)
        rows.append([label, seconds, attempts])
        print(f"{label:<26} {seconds:7.2f} s  {attempts:5d} attempts", flush=True)
    if args.results:
        title = (
            f"{args.links} links to a host that refuses connections, {args.retries} retries "
            f"each, concurrency {base.concurrency}"
        )
        columns = ["host-down breaker", "seconds", "attempts"]
        write_results(args.results, [table(title, columns, rows, formats=[None, ".2f", None])])


if __name__ == "__main__":
    main()
