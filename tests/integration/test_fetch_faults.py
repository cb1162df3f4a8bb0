"""`fetch_images` against a real HTTP server on 127.0.0.1 that throttles, stalls, truncates,
resets and lies (see faulty_server.py). Every route has a known final outcome, so the manifest is
compared with the server's ground truth exactly; the server's request counts prove what was and
was not downloaded (again)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pricefuse.core.layout import MANIFEST_COLUMNS
from pricefuse.data.images import FetchResult, cache_stem, fetch_images, validate_image
from tests.integration.faulty_server import FaultyServer, Route, load_images, png_bomb
from tests.support import PARAMS_YAML, project_params

pytestmark = [pytest.mark.integration, pytest.mark.network]

REAL_IMAGES = Path(__file__).resolve().parents[2].parent / "shared/data/amazon2025/images"
FETCH = project_params().fetch
# Small timeouts and backoffs keep the whole module fast; the logic is the production one.
FAST = replace(
    FETCH,
    concurrency=8,
    per_host=8,
    connect_timeout=1.0,
    read_timeout=0.5,
    retries=4,
    backoff_base=0.05,
    backoff_max=2.0,
    max_bytes=300_000,
    max_side=0,
    host_fail_threshold=3,
)


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    """Real product images (read in place) or synthetic ones when the shared set is absent."""
    return list(load_images(REAL_IMAGES, 40).values())


def oversized_png() -> bytes:
    noise = random.Random(1).randbytes(400 * 400 * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (400, 400), noise).save(out, format="PNG")
    return out.getvalue()


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "files").iterdir())


def assert_nothing_partial(cache: Path, result: FetchResult) -> None:
    """The files directory holds exactly the valid images of the manifest, nothing else."""
    valid = {Path(r.path).name for r in result.records if r.path}
    assert {p.name for p in cache_files(cache)} == valid
    for path in cache_files(cache):
        validate_image(path.read_bytes(), FETCH)


def manifest_on_disk(path: Path) -> list[tuple[str, ...]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    return [tuple(row) for row in rows[1:]]


def test_every_fault_ends_in_the_server_ground_truth(tmp_path: Path, bodies: list[bytes]) -> None:
    routes = {f"/ok{i}.jpg": Route(bodies[i]) for i in range(8)}
    # path -> (route, expected attempts); None where a transparent keep-alive retry may add one
    scripted: dict[str, tuple[Route, int | None]] = {
        "/throttled.jpg": (Route(bodies[8], script=("429", "429")), 3),
        "/retry-after.jpg": (Route(bodies[9], script=("429-retry-after",)), 2),
        "/retry-after-too-long.jpg": (
            Route(bodies[9], then="429-retry-after", retry_after="3600"),
            1,
        ),
        "/burst503.jpg": (Route(bodies[10], script=("503", "503", "503")), 4),
        "/slow.jpg": (Route(bodies[11], script=("slow",)), 2),
        "/truncated.jpg": (Route(bodies[12], script=("truncate",)), 2),
        "/truncated-unframed.jpg": (Route(bodies[13], script=("truncate-unframed",)), 2),
        "/reset.jpg": (Route(bodies[14], script=("reset", "reset")), None),
        "/moved.jpg": (Route(then="redirect", redirect_to="/canonical.jpg"), 1),
        "/html.jpg": (Route(then="html"), 1),
        "/corrupt.jpg": (Route(bodies[15], then="corrupt"), 1),
        "/bomb.png": (Route(png_bomb(), content_type="image/png"), 1),
        "/huge.png": (Route(oversized_png(), content_type="image/png"), 1),
        "/gone404.jpg": (Route(then="404"), 1),
        "/gone403.jpg": (Route(then="403"), 1),
        "/gone410.jpg": (Route(then="410"), 1),
        "/down503.jpg": (Route(then="503"), FAST.retries + 1),
    }
    routes |= {path: route for path, (route, _) in scripted.items()}
    routes["/canonical.jpg"] = Route(bodies[16])
    expected = {path: route.expected_status for path, route in routes.items()}
    expected |= {"/bomb.png": "bad", "/huge.png": "bad"}  # served fine; the bytes are the fault
    served = {path: route.body for path, route in routes.items()}
    served["/moved.jpg"] = routes["/canonical.jpg"].body

    with FaultyServer(routes, slow_seconds=1.5) as server:
        paths = [p for p in routes if p != "/canonical.jpg"]
        links = [server.url(p) for p in paths]
        result = fetch_images([*links, links[0], float("nan"), ""], tmp_path, FAST)
        counts, times = server.snapshot(), server.times

    assert result.skipped == 2
    assert [r.link for r in result.records] == links  # one row per distinct link, input order
    for path, record in zip(paths, result.records, strict=True):
        assert record.status == expected[path], (path, record)
        if record.status in ("ok", "cached"):
            assert Path(record.path).read_bytes() == served[path], path  # byte-identical
            assert record.bytes == len(served[path]) and record.error == ""
        else:
            assert record.path == "" and record.error, (path, record)
        attempts = scripted.get(path, (None, 1))[1]
        if attempts is not None:
            assert record.attempts == attempts, (path, record)
            assert counts[path] == attempts, (path, counts[path])
        else:
            assert counts[path] >= record.attempts >= 2, (path, record)
    assert counts["/canonical.jpg"] == 1
    assert counts["/ok0.jpg"] == 1  # the repeated link was fetched once
    retry_after_gap = times["/retry-after.jpg"][1] - times["/retry-after.jpg"][0]
    assert retry_after_gap >= 0.95  # the server asked for 1 s
    by_path = dict(zip(paths, result.records, strict=True))
    assert (
        "Retry-After 3600s exceeds fetch.backoff_max" in by_path["/retry-after-too-long.jpg"].error
    )
    assert "HTML" in by_path["/html.jpg"].error
    assert "max_pixels" in by_path["/bomb.png"].error
    assert "max_bytes" in by_path["/huge.png"].error
    assert manifest_on_disk(result.manifest) == [r.as_row() for r in result.records]
    assert_nothing_partial(tmp_path, result)


def test_downscaled_on_write(tmp_path: Path, bodies: list[bytes]) -> None:
    routes = {f"/img{i}.jpg": Route(body) for i, body in enumerate(bodies[:6])}
    routes["/slow.jpg"] = Route(bodies[6], script=("slow",))
    cfg = replace(FAST, max_side=64)
    with FaultyServer(routes, slow_seconds=1.0) as server:
        result = fetch_images([server.url(p) for p in routes], tmp_path, cfg)
    for path, record in zip(routes, result.records, strict=True):
        assert record.status == "ok"
        source = Image.open(io.BytesIO(routes[path].body))
        cached = Image.open(record.path)
        cached.load()
        scale = 64 / max(source.size)
        assert cached.format == "JPEG" and max(cached.size) == 64
        for got, original in zip(cached.size, source.size, strict=True):
            assert abs(got - original * scale) <= 1
    assert_nothing_partial(tmp_path, result)


def closed_port() -> int:
    """A loopback port nobody listens on: connections are refused at once, as offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_host_fails_fast_in_one_line(
    tmp_path: Path, bodies: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    routes = {f"/ok{i}.jpg": Route(bodies[i]) for i in range(4)}
    cfg = replace(FAST, retries=5, backoff_base=0.2)
    with FaultyServer(routes) as server, caplog.at_level(logging.WARNING):
        dead_links = [f"{dead}/img/{i}.jpg" for i in range(40)]
        result = fetch_images([*dead_links, *(server.url(p) for p in routes)], tmp_path, cfg)
    records = {r.link: r for r in result.records}
    assert all(records[link].status == "failed" for link in dead_links)
    assert all("host unreachable" in records[link].error for link in dead_links)
    assert result.counts["ok"] == len(routes)  # other hosts are unaffected
    assert result.hosts_down == (dead,)
    # Without the breaker: 40 links x 6 attempts with backoff (>= 0.1 s, 0.2 s, ... each).
    # The time it saves: python benchmarks/fetch_unreachable.py
    assert sum(records[link].attempts for link in dead_links) <= cfg.concurrency + 3
    lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(lines) == 1 and dead in lines[0]


FETCH_SCRIPT = """
import sys
from dataclasses import replace
from pricefuse.core.config import load_params
from pricefuse.data.images import fetch_images
links = open(sys.argv[1]).read().split()
fetch = load_params(sys.argv[3]).fetch
cfg = replace(fetch, concurrency=4, per_host=4, read_timeout=5.0, max_side=0)
print(fetch_images(links, sys.argv[2], cfg).counts)
"""


def test_kill_9_then_restart_downloads_nothing_valid_again(
    tmp_path: Path, bodies: list[bytes]
) -> None:
    routes = {f"/img/{i}.jpg": Route(bodies[i % len(bodies)]) for i in range(150)}
    cache = tmp_path / "images"
    links_file = tmp_path / "links.txt"
    command = [sys.executable, "-c", FETCH_SCRIPT, str(links_file), str(cache), str(PARAMS_YAML)]
    with FaultyServer(routes, delay=0.03) as server:
        links = [server.url(p) for p in routes]
        links_file.write_text("\n".join(links))
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while sum(server.snapshot().values()) < 50 and time.monotonic() < deadline:
            assert process.poll() is None, "the fetch finished before it could be killed"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        at_kill = server.snapshot()

        landed = {p.name.partition(".")[0] for p in cache_files(cache) if p.suffix == ".jpg"}
        for path in cache_files(cache):
            if not path.name.endswith(".part"):
                validate_image(path.read_bytes(), FETCH)  # whatever has a final name is complete
        done = [link for link in links if cache_stem(link) in landed]
        assert 0 < len(done) < len(links), "the kill did not land mid-run"

        restart = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=60)
        assert restart.returncode == 0, restart.stderr.decode()
        after = server.snapshot()

    for link, path in zip(links, routes, strict=True):
        if link in done:
            assert after[path] == at_kill[path], f"{path} was valid but downloaded again"
        else:
            assert after[path] >= 1
    manifest = pd.read_csv(cache / "manifest.csv", keep_default_na=False)
    status = dict(zip(manifest["link"], manifest["status"], strict=True))
    assert {status[link] for link in done} == {"cached"}
    assert {status[link] for link in links if link not in done} == {"ok"}
    route_of = dict(zip(links, routes.values(), strict=True))
    for link, cached in zip(manifest["link"], manifest["path"], strict=True):
        assert (tmp_path / cached).read_bytes() == route_of[link].body
    assert not [p for p in cache_files(cache) if p.name.endswith(".part")]
    assert not (cache / "journal.csv").exists()


def test_stage_logs_counts_to_mlflow_and_resumes(
    tmp_path: Path, bodies: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from pricefuse.recording import tracking
    from pricefuse.stages import fetch_images as stage

    monkeypatch.chdir(tmp_path)
    local = Path("data/raw/demo/images/1.jpg")
    local.parent.mkdir(parents=True)
    local.write_bytes(bodies[20])
    routes = {f"/p{i}.jpg": Route(bodies[i]) for i in range(4)} | {"/gone.jpg": Route(then="404")}
    params = project_params(
        data={"train_csv": "train.csv", "test_csv": "test.csv", "images_dir": "data/images"},
        fetch=asdict(FAST),
    )
    with FaultyServer(routes) as server:
        urls = [server.url(p) for p in routes]
        train_links = [*urls[:3], str(local), None, urls[4]]
        pd.DataFrame(
            {
                "sample_id": range(6),
                "catalog_content": "Item Name: x",
                "image_link": train_links,
                "price": 1.0,
            }
        ).to_csv("train.csv", index=False)
        pd.DataFrame(
            {"sample_id": [10, 11], "catalog_content": "Item Name: y", "image_link": urls[2:4]}
        ).to_csv("test.csv", index=False)
        stage.run(params)
        first_counts = server.snapshot()
        stage.run(params)
        second_counts = server.snapshot()

    meta = tracking.read_meta("data/images")
    assert meta["stage"] == "fetch_images"
    assert meta["counts"] == {"ok": 0, "cached": 5, "missing": 1, "bad": 0, "failed": 0}
    client = MlflowClient()
    first, second = (
        client.get_run(run.info.run_id)
        for run in sorted(
            client.search_runs(client.get_experiment_by_name("pricefuse").experiment_id),
            key=lambda run: run.info.start_time,
        )
    )
    assert first.data.tags["stage"] == "fetch_images"
    assert first.data.metrics["n_ok"] == 5 and first.data.metrics["n_missing"] == 1
    assert first.data.metrics["images_per_s"] > 0 and first.data.metrics["bytes_fetched"] > 0
    assert second.data.metrics["n_cached"] == 5 and second.data.metrics["n_ok"] == 0
    assert second.info.run_id == meta["run_id"]
    ok_paths = [p for p in routes if p != "/gone.jpg"]
    assert all(second_counts[p] == first_counts[p] == 1 for p in ok_paths)
    assert second_counts["/gone.jpg"] == 2  # missing links are asked again on the next run
    assert json.loads(Path("metrics/fetch_images.json").read_text())["n_cached"] == 5  # DVC's
    rows = pd.read_csv("data/images/manifest.csv", keep_default_na=False)
    assert rows["path"].str.startswith("data/images/files/").sum() == 5
