"""benchmarks/serve_load.py's parts that need no served model: the request bodies are what they
claim (rows, sizes against the limits), the figures follow from made-up records, the verdict
names what failed, requests record status / timeout / no Content-Type as sent, and the process
tree's memory is read from /proc. (The benchmark itself runs a live `mlflow models serve` of a
built project under load for a minute: far too slow for a test.)"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests
from benchmarks import serve_load
from benchmarks.serve_load import Body, Record
from PIL import Image

from tests import support

TEXT = 'Item Name: "Happy" Cold Brew Coffee, 16.9 Fl Oz\nBullet Point 1: Recyclable\nValue: 16.9'


def rows_of(body: Body) -> pd.DataFrame:
    split = json.loads(body.data)["dataframe_split"]
    return pd.DataFrame(split["data"], columns=split["columns"])


# --- request bodies -----------------------------------------------------------------------------


def test_row_count_bodies_carry_the_rows_they_claim() -> None:
    many = serve_load.too_many_rows_json(max_rows=10, n=500)
    assert many.rows == len(rows_of(many)) == 500 and many.content_type == serve_load.JSON
    # never fewer than max_rows + 1, whatever n says
    assert serve_load.too_many_rows_json(max_rows=1000, n=50).rows == 1001
    parquet = serve_load.parquet_rows(n=1_000_000)
    assert pq.ParquetFile(io.BytesIO(parquet.data)).metadata.num_rows == parquet.rows == 1_000_000
    assert len(parquet.data) < 100_000  # a few KB: the expansion is the attack
    assert parquet.content_type == serve_load.PARQUET


def test_long_text_rows_fill_the_body_to_just_under_its_limit() -> None:
    body = serve_load.long_text_rows(
        TEXT, max_rows=50, max_body_bytes=200_000, max_text_chars=10**5
    )
    frame = rows_of(body)
    assert body.rows == len(frame) == 50
    assert 0.9 * 200_000 < len(body.data) <= 200_000
    capped = serve_load.long_text_rows(TEXT, max_rows=5, max_body_bytes=200_000, max_text_chars=300)
    assert rows_of(capped)["catalog_content"].str.len().max() == 300  # each text within its limit
    over = serve_load.over_byte_limit(5000)
    assert len(over.data) > 5000 and len(rows_of(over)) == over.rows == 1


def test_large_images_fit_one_by_one_and_pass_the_request_budget_together() -> None:
    body = serve_load.large_images(max_request_pixels=3_000_000, image_max_pixels=2_000_000)
    images = rows_of(body)["image_b64"].tolist()
    assert body.rows == len(images) == 3
    sizes = [Image.open(io.BytesIO(base64.b64decode(b))).size for b in images]
    pixels = [w * h for w, h in sizes]
    assert all(p <= 2_000_000 for p in pixels)  # each within one image's limit
    assert pixels[0] <= 3_000_000 < sum(pixels)  # the first fits the budget, all do not


def test_hang_links_and_odd_bodies_are_what_they_claim() -> None:
    hang = serve_load.hang_links("http://127.0.0.1:9/hang.jpg", rows=8)
    links = rows_of(hang)["image_link"].tolist()
    assert hang.rows == 8 and len(set(links)) == 8
    assert all(link.startswith("http://127.0.0.1:9/hang.jpg?") for link in links)
    odd = {body.kind: body for body in serve_load.odd_bodies(TEXT)}
    assert (
        len(pd.read_csv(io.BytesIO(odd["csv"].data))) == 2 and odd["csv"].content_type == "text/csv"
    )
    assert odd["nested_json"].data.count(b"[") == 50_000
    assert odd["number_6000_digits"].data.count(b"9") == 6000
    assert odd["no_content_type"].content_type is None
    with pytest.raises(RecursionError):
        json.loads(odd["nested_json"].data)


def test_hostile_bodies_cover_every_kind_sized_from_the_limits() -> None:
    limits = {
        "max_rows": 20,
        "max_body_bytes": 100_000,
        "max_text_chars": 100_000,
        "max_request_pixels": 1_000_000,
        "light_rows": 4,
    }
    bodies = serve_load.hostile_bodies(TEXT, limits, 600_000, "http://127.0.0.1:9/hang.jpg")
    kinds = {body.kind for body in bodies}
    expected = set(serve_load.EXPECTED)
    if not hasattr(support, "slow_decoding_image_b64"):  # the decode bombs need it
        expected.discard("decode_bombs")
    assert kinds == expected
    by_kind = {body.kind: body for body in bodies}
    assert by_kind["max_rows_long_texts"].rows == 20
    assert (
        len(by_kind["max_rows_long_texts"].data) <= 100_000 < len(by_kind["body_over_limit"].data)
    )
    assert by_kind["hang_links"].rows == 4  # light: never waits for a turn
    if "decode_bombs" in by_kind:
        assert by_kind["decode_bombs"].rows == len(rows_of(by_kind["decode_bombs"])) == 2


def test_good_bodies_are_one_row_each_text_only_then_with_an_image() -> None:
    text, image = serve_load.good_bodies(7, TEXT, serve_load.jpeg_b64(300, 300))
    assert [text.kind, image.kind] == list(serve_load.GOOD_KINDS)
    assert list(rows_of(text).columns) == ["sample_id", "catalog_content"]
    row = rows_of(image).iloc[0]
    assert row["sample_id"] == 7 and row["catalog_content"] == TEXT
    assert Image.open(io.BytesIO(base64.b64decode(row["image_b64"]))).size == (300, 300)


# --- figures ------------------------------------------------------------------------------------


def test_summary_counts_errors_and_takes_percentiles_of_the_answered_good_requests() -> None:
    good = [Record("good_text", "200", s / 1000) for s in range(1, 101)]  # 1..100 ms
    good += [
        Record("good_image", "200", 0.05, ("ok",)),
        Record("good_image", "200", 0.05, ("decode_busy",)),
    ]
    good += [Record("good_text", "503", 2.0), Record("good_image", "timeout", 70.0)]
    hostile = [
        Record("rows_json_100k", "413", 0.2),
        Record("rows_json_100k", "413", 0.4),
        Record("images_pixel_budget", "200", 3.0, ("ok", "pixel_budget", "pixel_budget")),
        Record("images_pixel_budget", "503", 2.0),
    ]
    summary = serve_load.summarize(good + hostile)
    assert summary["good"] == 104 and summary["errors"] == 2
    assert summary["error_statuses"] == Counter({"503": 1, "timeout": 1})
    answered = [s / 1000 for s in range(1, 101)] + [0.05, 0.05]
    assert summary["p50_ms"] == pytest.approx(serve_load.percentile_ms(answered, 0.5))
    assert summary["p99_ms"] == pytest.approx(serve_load.percentile_ms(answered, 0.99))
    assert summary["max_ms"] == pytest.approx(100.0)  # the timed-out request is not latency
    assert summary["good_images"] == Counter({"ok": 1, "decode_busy": 1})
    pixels = summary["hostile"]["images_pixel_budget"]
    assert pixels["statuses"] == Counter({"200": 1, "503": 1})
    assert pixels["images"] == Counter({"pixel_budget": 2, "ok": 1})
    assert summary["hostile"]["rows_json_100k"]["seconds"]["413"] == pytest.approx(0.3)


def test_percentiles_of_known_values() -> None:
    assert serve_load.percentile_ms([0.001 * i for i in range(1, 102)], 0.5) == pytest.approx(51.0)
    assert serve_load.percentile_ms([0.001 * i for i in range(101)], 0.99) == pytest.approx(99.0)
    assert serve_load.percentile_ms([], 0.5) != serve_load.percentile_ms([], 0.5)  # NaN


def test_verdict_passes_only_when_every_condition_holds() -> None:
    ok = serve_load.summarize([Record("good_text", "200", 0.01)])
    assert serve_load.verdict(ok, 1.0, True, True) == (True, [])
    assert serve_load.verdict(ok, 1.0, True, None)[0]  # fetches not exercised: not a failure
    bad = serve_load.summarize([Record("good_text", "504", 30.0)])
    passed, failed = serve_load.verdict(bad, serve_load.MEMORY_CEILING_GIB + 0.5, False, False)
    assert not passed and len(failed) == 4
    assert "1 good request(s) failed" in failed[0] and "ceiling" in failed[1]
    assert serve_load.verdict(serve_load.summarize([]), 1.0, True, True)[1] == [
        "no good request was sent"
    ]


def test_fetch_bound_is_the_tighter_limit_per_worker_process() -> None:
    limits = {"fetch_concurrency": 16, "fetch_per_host": 4}
    assert serve_load.fetch_bound(limits, workers=1) == 4
    assert serve_load.fetch_bound({**limits, "fetch_per_host": 32}, workers=2) == 32


# --- requests -----------------------------------------------------------------------------------


class _Echo(BaseHTTPRequestHandler):
    """Answers every POST with one row whose image_status is the request's Content-Type (or
    "none"); a body of b"slow" is answered after 2 s, b"fail" with a 503."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if body == b"slow":
            time.sleep(2)
        status = 503 if body == b"fail" else 200
        answer = {"predictions": [{"image_status": self.headers.get("Content-Type", "none")}]}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_send_records_status_image_statuses_and_timeouts(echo: str) -> None:
    session = requests.Session()
    record = serve_load.send(session, echo, Body("csv", b"a\n1\n", "text/csv", 1), timeout=5)
    assert (record.kind, record.status, record.image_statuses) == ("csv", "200", ("text/csv",))
    bare = serve_load.send(session, echo, Body("no_content_type", b"{}", None, 1), timeout=5)
    assert bare.image_statuses == ("none",)  # no Content-Type header was sent at all
    assert serve_load.send(session, echo, Body("x", b"fail", serve_load.JSON, 1), 5).status == "503"
    slow = serve_load.send(session, echo, Body("x", b"slow", serve_load.JSON, 1), timeout=0.5)
    assert slow.status == "timeout" and slow.seconds < 2
    closed = serve_load.send(session, "http://127.0.0.1:9", Body("x", b"", None, 0), timeout=2)
    assert closed.status == "ConnectionError"


def test_run_load_splits_clients_into_good_and_hostile(echo: str) -> None:
    good = [Body("good_text", b"{}", serve_load.JSON, 1)]
    hostile = [Body("csv", b"a\n", "text/csv", 1), Body("nested_json", b"[]", serve_load.JSON, 0)]
    records = serve_load.run_load(echo, good, hostile, 3, 0.5, 5, progress=lambda _: None)
    kinds = Counter(r.kind for r in records)
    assert set(kinds) == {"good_text", "csv", "nested_json"}
    only_good = serve_load.run_load(echo, good, hostile, 1, 0.2, 5, progress=lambda _: None)
    assert {r.kind for r in only_good} == {"good_text"}  # one client: it sends the good rows


# --- memory -------------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tree_memory_sums_this_process_and_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        total, largest, count = serve_load.tree_memory(os.getpid())
        own = _status_kib(os.getpid(), "VmRSS:") * 1024
        child_rss = _status_kib(child.pid, "VmRSS:") * 1024
        assert count >= 2  # this process and the child at least
        assert total >= 0.9 * (own + child_rss)
        assert largest >= _status_kib(os.getpid(), "VmHWM:") * 1024 * 0.9
        alone = serve_load.tree_memory(child.pid)
        assert alone[2] == 1 and 0 < alone[0] < total
        sampler = serve_load.MemorySampler(os.getpid(), interval=0.05)
        with sampler:
            time.sleep(0.2)
        assert sampler.samples >= 2 and sampler.peak_rss >= 0.9 * own
        assert sampler.max_processes >= 2
    finally:
        child.kill()
        child.wait()
    assert serve_load.tree_memory(child.pid) == (0, 0, 0)  # gone: nothing to read


# --- image fetches open at once -----------------------------------------------------------------


def test_established_reads_the_state_and_local_port_of_a_tcp_table(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    table.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000\n"  # listening on 8080
        "   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000\n"  # established on 8080
        "   2: 0100007F:1F90 0100007F:D432 08 00000000:00000000\n"  # close-wait: client gone
        "   3: 0100007F:D431 0100007F:1F90 01 00000000:00000000\n"  # the client's own end
    )
    assert serve_load.established(8080, table) == 1
    assert serve_load.established(0xD431, table) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_established_counts_a_servers_connections_until_the_client_closes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert serve_load.established(port) == 0
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        sampler = serve_load.PeakSampler(lambda: serve_load.established(port), interval=0.01)
        with sampler:
            time.sleep(0.1)
            client.close()
            time.sleep(0.1)
        assert sampler.peak == 1 and sampler.samples >= 5
        assert serve_load.established(port) == 0  # closed by the client: no longer open
        accepted.close()


def test_results_tables_hold_the_printed_figures() -> None:
    records = [Record("good_text", "200", 0.1), Record("good_image", "200", 0.3, ("ok",))]
    records += [Record("hang_links", "200", 25.0, ("timeout",) * 4 + ("fetch_busy",) * 4)]
    memory = serve_load.MemorySampler(os.getpid())
    memory.peak_rss, memory.peak_hwm = int(1.5 * serve_load.GIB), serve_load.GIB
    args = argparse.Namespace(clients=6, seconds=30.0, workers=1, timeout=60, limits=None)
    summary = serve_load.summarize(records)
    good, hostile = serve_load.results_tables(summary, memory, True, (4, 8), 4, args)
    figures = dict(good["rows"])
    assert (
        figures["good requests"] == 2
        and figures["good requests failed (not 200 or no answer)"] == 0
    )
    assert figures["peak RSS of the served process tree (GiB)"] == pytest.approx(1.5)
    assert figures["server stayed up"] == "true"
    assert hostile["rows"] == [["hang_links", "200", 1, 25.0, "timeout 4, fetch_busy 4"]]
