"""Load on the served model under a hostile mix: are good one-row requests still answered?

    python benchmarks/serve_load.py --project DIR                    # 8 clients for 60 s
    python benchmarks/serve_load.py --project DIR --clients 6 --seconds 30
    python benchmarks/serve_load.py --project DIR --workers 1 --timeout 60 \\
        --limits '{"max_rows": 200}'                                 # SERVING_MODEL_CONFIG
    python benchmarks/serve_load.py --project DIR --results          # docs/results/serve_load.json

DIR is a built project (`pricefuse demo-data && dvc repro`: its sqlite:///mlflow.db registry and
data/raw test CSV). The run starts a live `mlflow models serve -m MODEL --env-manager local -w
WORKERS -t TIMEOUT` (benchmarks/serve.py's `Server`), with `--limits` as its serve-time model
config (SERVING_MODEL_CONFIG: flat `serving.*` limit names), and a loopback image server in this
process (tests/integration/faulty_server.py) whose /hang.jpg trickles one byte per 0.1 s. Then
`--clients` clients send requests back to back for `--seconds`:
  good     half of them (at least one): one text-only row of the test CSV and one row with a
           small base64 image (a test row's image file, else a generated 300x300 JPEG), in turn;
  hostile  the others, each cycling through every attack found on the server (`hostile_bodies`):
           more rows than serving.max_rows (100,000 JSON rows; a few KB of Parquet expanding to
           a million rows), the most rows allowed with long texts just under the byte limit, a
           body over serving.max_body_bytes, several large images past the request's pixel
           budget, progressive-JPEG decode bombs (`tests.support.slow_decoding_image_b64`),
           rows whose image links hang (http://127.0.0.1:PORT/hang.jpg), and the bodies MLflow
           used to answer badly: CSV, JSON nested 50,000 deep, a number of 6,000 digits, no
           Content-Type.
Every request has a client timeout of the server's timeout + 10 s. It measures:
  - the good requests: count, p50/p99 latency and errors (any answer but 200, or no answer);
  - the hostile ones: count by kind x HTTP status, with the rows' `image_status` values;
  - memory: the served process tree (`mlflow models serve` and every descendant: uvicorn, its
    workers, the image decoder processes) sampled every 0.5 s, the peak of its summed VmRSS
    against MEMORY_CEILING_GIB, and the largest VmHWM of any one process;
  - whether the server stayed up (process alive, /ping 200 after the load), and the most image
    fetches open at once against the served fetch limits: the image server's TCP connections
    in state ESTABLISHED (/proc/net/tcp, sampled every 0.05 s). Not the image server's own
    `max_in_flight` gauge, printed beside it: a handler trickling a body counts its connection
    until its next byte fails to send, so when the model abandons fetches at their deadline
    and waiting rows take the freed slots at once, the gauge briefly counts both.
The verdict line says PASS when no good request failed, the peak stayed under the ceiling, the
server stayed up and the fetches stayed bounded. Figures depend on the machine and its load:
printed, not asserted; the exit status is 0 unless the server failed to start. Not a test.

Image links: the served model fetches only from `serving.image_hosts`, and loopback addresses
only inside `serving.trusted_networks`. For the hanging links to reach a fetch, DIR must be
built with `serving.image_hosts` including 127.0.0.1 and `serving.trusted_networks:
["127.0.0.0/8"]`; otherwise those rows are refused at once (`host_not_allowed`). A probe
request (one row linking the image server's /ok.jpg) tells which, and the run prints it.

Settings for `mlflow models serve` (used here by default, and recommended):
  --workers 1      each worker process loads the whole model and has its own copy of every
                   per-process bound (serving.heavy_requests, decode_workers, fetch_concurrency,
                   request_threads): N workers take about N times the memory this benchmark
                   prints, and N times the concurrent work. Add workers only when memory allows
                   N x the peak here (and cores for N heavy requests at once).
  --timeout 60     (or MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=60; MLflow's default) must exceed
                   serving.request_seconds (30) by more than a second: the model stops a
                   request's work at min(request_seconds, timeout - 1 s) and answers its own 504
                   that names the limit, before MLflow's bare timeout would.
  uvicorn's --limit-concurrency and --backlog are not reachable through `mlflow models serve`
  (it builds the uvicorn command from host, port and workers only); concurrency is bounded
  inside the server instead (serving.request_threads, heavy_requests, queue_seconds). A limit
  on connections belongs in a reverse proxy in front.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402
from benchmarks.serve import Server, default_model, demo_rows  # noqa: E402

from tests.support import PeakSampler, established  # noqa: E402

MEMORY_CEILING_GIB = 3.0  # the served process tree's peak RSS under the hostile mix
GIB = 2**30
SAMPLE_SECONDS = 0.5  # how often the process tree's memory is read
CLIENT_MARGIN_S = 10.0  # a client waits the server's timeout plus this for an answer
JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
HANG_PATH = "/hang.jpg"
OK_PATH = "/ok.jpg"
GOOD_KINDS = ("good_text", "good_image")
SHORT_TEXT = "Item Name: Green Tea, 20 Bags Value: 20.0 Unit: Count"
# What each hostile kind is expected to get from the bounded server (printed beside the counts).
EXPECTED = {
    "rows_json_100k": "413 (serving.max_rows), or 503 (a large body is parsed in its turn)",
    "rows_parquet_1m": "413 (serving.max_rows, from the Parquet metadata)",
    "max_rows_long_texts": "200, or 503 (no turn) / 504 (serving.request_seconds)",
    "body_over_limit": "413 (serving.max_body_bytes)",
    "images_pixel_budget": "200 with pixel_budget rows (or 503 when no turn)",
    "decode_bombs": "200 with decode_timeout / decode_busy (and pixel_budget) rows",
    "hang_links": "200 with timeout / fetch_busy rows (the fetch deadline), or 504",
    "csv": "200",
    "nested_json": "400 (nested too deeply)",
    "number_6000_digits": "400 (not valid JSON)",
    "no_content_type": "415",
}


@dataclass(frozen=True)
class Body:
    """One request: its bytes, Content-Type (None: no header at all) and row count."""

    kind: str
    data: bytes
    content_type: str | None
    rows: int


@dataclass(frozen=True)
class Record:
    """One request's outcome: the HTTP status ("200") or why none came ("timeout", an
    exception's name), the seconds it took, and the answer rows' image_status values."""

    kind: str
    status: str
    seconds: float
    image_statuses: tuple[str, ...] = ()


# --- request bodies ---------------------------------------------------------------------------


def rows_frame(n: int, text: str, **columns: list[Any]) -> pd.DataFrame:
    return pd.DataFrame({"sample_id": list(range(n)), "catalog_content": [text] * n, **columns})


def split_body(frame: pd.DataFrame) -> bytes:
    """MLflow's JSON `dataframe_split` body of `frame`."""
    return json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)}).encode()


def jpeg_b64(width: int, height: int, seed: int = 0, quality: int = 85) -> str:
    """A base64 JPEG of width x height pixels: a flat colour with a few rectangles, so a large
    canvas stays small in bytes (its decode still costs every pixel)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + width // 4, y0 + height // 4)
        draw.rectangle(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return base64.b64encode(out.getvalue()).decode()


def good_bodies(sample_id: int, text: str, image_b64: str) -> list[Body]:
    """The two good requests: one text-only row, one row with a small base64 image."""
    text_row = pd.DataFrame({"sample_id": [sample_id], "catalog_content": [text]})
    image_row = text_row.assign(image_b64=[image_b64])
    return [
        Body("good_text", split_body(text_row), JSON, 1),
        Body("good_image", split_body(image_row), JSON, 1),
    ]


def too_many_rows_json(max_rows: int, n: int = 100_000, text: str = SHORT_TEXT) -> Body:
    """A JSON body of `n` short rows (at least max_rows + 1): refused for its rows."""
    n = max(n, max_rows + 1)
    return Body("rows_json_100k", split_body(rows_frame(n, text)), JSON, n)


def parquet_rows(n: int = 1_000_000, text: str = SHORT_TEXT) -> Body:
    """A few KB of Parquet (one repeated text, dictionary-encoded, zstd) expanding to `n` rows."""
    out = io.BytesIO()
    pd.DataFrame({"catalog_content": [text] * n}).to_parquet(out, compression="zstd")
    return Body("rows_parquet_1m", out.getvalue(), PARQUET, n)


def long_text_rows(text: str, max_rows: int, max_body_bytes: int, max_text_chars: int) -> Body:
    """`max_rows` rows whose texts (the good row's text repeated, each within max_text_chars)
    fill the body to just under `max_body_bytes`: the largest request the limits accept."""
    flat = " ".join(text.split())  # no newlines or quotes to escape: characters = bytes
    budget = int(max_body_bytes * 0.97)
    chars = min(max_text_chars, max(budget // max_rows - 40, 1))
    while True:
        long = (flat + " ") * (chars // (len(flat) + 1) + 1)
        data = split_body(rows_frame(max_rows, long[:chars]))
        if len(data) <= budget or chars == 1:
            return Body("max_rows_long_texts", data, JSON, max_rows)
        chars = max(int(chars * 0.95), 1)


def over_byte_limit(max_body_bytes: int) -> Body:
    """One row whose text makes the body just over `max_body_bytes`."""
    data = split_body(rows_frame(1, "x" * (max_body_bytes + 1)))
    return Body("body_over_limit", data, JSON, 1)


def large_images(max_request_pixels: int, image_max_pixels: int, seed: int = 0) -> Body:
    """Rows of square images each within one image's limit (`fetch.max_pixels`) and together
    past the request's pixel budget: the first fit, the rest are priced text-only."""
    side = math.isqrt(int(0.9 * min(image_max_pixels, max_request_pixels)))
    count = max_request_pixels // (side * side) + 2
    image = jpeg_b64(side, side, seed)
    frame = rows_frame(count, SHORT_TEXT, image_b64=[image] * count)
    return Body("images_pixel_budget", split_body(frame), JSON, count)


def decode_bombs(count: int = 2) -> Body | None:
    """Rows whose base64 image takes seconds to decode; None (kind skipped) when
    tests.support has no `slow_decoding_image_b64` yet."""
    try:
        from tests.support import slow_decoding_image_b64
    except ImportError:
        return None
    bomb = slow_decoding_image_b64()
    frame = rows_frame(count, SHORT_TEXT, image_b64=[bomb] * count)
    return Body("decode_bombs", split_body(frame), JSON, count)


def hang_links(url: str, rows: int) -> Body:
    """`rows` rows linking a hanging image (distinct query strings: one fetch each)."""
    links = [f"{url}?row={i}" for i in range(rows)]
    frame = rows_frame(rows, SHORT_TEXT, image_link=links)
    return Body("hang_links", split_body(frame), JSON, rows)


def odd_bodies(text: str) -> list[Body]:
    """The bodies MLflow answered badly (a 500, a stack trace, or every CSV a 400)."""
    csv = rows_frame(2, " ".join(text.split())).to_csv(index=False).encode()
    number = b'{"inputs": {"catalog_content": [' + b"9" * 6000 + b"]}}"
    return [
        Body("csv", csv, CSV, 2),
        Body("nested_json", b"[" * 50_000 + b"]" * 50_000, JSON, 0),
        Body("number_6000_digits", number, JSON, 1),
        Body("no_content_type", split_body(rows_frame(1, SHORT_TEXT)), None, 1),
    ]


def hostile_bodies(
    text: str, limits: dict[str, Any], image_max_pixels: int, hang_url: str
) -> list[Body]:
    """Every hostile kind (module docstring), sized from the served `limits`."""
    bodies = [
        too_many_rows_json(int(limits["max_rows"])),
        parquet_rows(),
        long_text_rows(
            text,
            int(limits["max_rows"]),
            int(limits["max_body_bytes"]),
            int(limits["max_text_chars"]),
        ),
        over_byte_limit(int(limits["max_body_bytes"])),
        large_images(int(limits["max_request_pixels"]), image_max_pixels),
        decode_bombs(),
        hang_links(hang_url, int(limits["light_rows"])),
        *odd_bodies(text),
    ]
    return [body for body in bodies if body is not None]


# --- requests and clients ---------------------------------------------------------------------


def send(session: requests.Session, url: str, body: Body, timeout: float) -> Record:
    """POST one body to /invocations; never raises."""
    headers = {} if body.content_type is None else {"Content-Type": body.content_type}
    start = time.perf_counter()
    statuses: tuple[str, ...] = ()
    try:
        response = session.post(
            f"{url}/invocations", data=body.data, headers=headers, timeout=timeout
        )
        status = str(response.status_code)
        if response.status_code == 200:
            statuses = image_statuses(response.text)
    except requests.Timeout:
        status = "timeout"
    except requests.RequestException as exc:
        status = type(exc).__name__
    return Record(body.kind, status, time.perf_counter() - start, statuses)


def image_statuses(text: str) -> tuple[str, ...]:
    """The `image_status` of every row of a 200 answer (empty when it has none)."""
    try:
        predictions = json.loads(text).get("predictions", [])
    except (ValueError, AttributeError):
        return ()
    return tuple(str(row.get("image_status")) for row in predictions if isinstance(row, dict))


def client(
    url: str,
    bodies: Sequence[Body],
    offset: int,
    stop: float,
    timeout: float,
    out: list[Record],
) -> None:
    """Send `bodies` in turn from `offset`, back to back, until `stop` (time.monotonic)."""
    session = requests.Session()
    i = offset
    while time.monotonic() < stop:
        out.append(send(session, url, bodies[i % len(bodies)], timeout))
        i += 1
    session.close()


# --- memory of the served process tree ---------------------------------------------------------


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(sum of VmRSS, largest VmHWM, processes) over `pid` and its descendants, in bytes."""
    from tests.support import tree_status

    processes = tree_status(pid)
    rss = sum(process.get("VmRSS", 0) for process in processes)
    return rss, max((process.get("VmHWM", 0) for process in processes), default=0), len(processes)


class MemorySampler:
    """Samples `tree_memory(pid)` every `interval` seconds on a thread, keeping the peaks."""

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss = self.peak_hwm = self.max_processes = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        rss, hwm, count = tree_memory(self.pid)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_hwm = max(self.peak_hwm, hwm)
        self.max_processes = max(self.max_processes, count)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """The q-quantile (0..1, linear) of `seconds` in milliseconds; NaN when there are none."""
    if not seconds:
        return float("nan")
    return float(np.quantile(np.asarray(seconds, dtype=float), q) * 1000.0)


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """The good requests' count, errors and latency (of those answered 200), and the hostile
    ones by kind: status counts, median seconds per status, image_status counts."""
    good = [r for r in records if r.kind in GOOD_KINDS]
    answered = [r.seconds for r in good if r.status == "200"]
    hostile: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.kind in GOOD_KINDS:
            continue
        fresh = {"statuses": Counter(), "seconds": {}, "images": Counter()}
        entry = hostile.setdefault(r.kind, fresh)
        entry["statuses"][r.status] += 1
        entry["seconds"].setdefault(r.status, []).append(r.seconds)
        entry["images"].update(r.image_statuses)
    for entry in hostile.values():
        entry["seconds"] = {k: statistics.median(v) for k, v in entry["seconds"].items()}
    return {
        "good": len(good),
        "good_by_kind": Counter(r.kind for r in good),
        "errors": len(good) - len(answered),
        "error_statuses": Counter(r.status for r in good if r.status != "200"),
        "p50_ms": percentile_ms(answered, 0.50),
        "p99_ms": percentile_ms(answered, 0.99),
        "max_ms": max(answered) * 1000.0 if answered else float("nan"),
        "good_images": Counter(s for r in good if r.kind == "good_image" for s in r.image_statuses),
        "hostile": hostile,
    }  # fmt: skip


def fetch_bound(limits: dict[str, Any], workers: int) -> int:
    """The most fetches to one host the served model may hold open at once: its per-process
    `fetch_concurrency` and `fetch_per_host` limits, times the worker processes."""
    return min(int(limits["fetch_concurrency"]), int(limits["fetch_per_host"])) * workers


def verdict(
    summary: dict[str, Any], peak_gib: float, stayed_up: bool, fetches_bounded: bool | None
) -> tuple[bool, list[str]]:
    """PASS or not, and the failed conditions (each named)."""
    failed = []
    if summary["good"] == 0:
        failed.append("no good request was sent")
    if summary["errors"]:
        failed.append(f"{summary['errors']} good request(s) failed")
    if peak_gib > MEMORY_CEILING_GIB:
        failed.append(f"peak RSS {peak_gib:.2f} GiB over the {MEMORY_CEILING_GIB:g} GiB ceiling")
    if not stayed_up:
        failed.append("the server did not stay up")
    if fetches_bounded is False:
        failed.append("more image fetches at once than the serving limits allow")
    return not failed, failed


def counts_text(counts: Counter, width: int = 80) -> str:
    """`a 3, b 1` (most common first), cut to `width` characters."""
    text = ", ".join(f"{key} {n}" for key, n in counts.most_common())
    return text if len(text) <= width else text[: width - 3] + "..."


# --- the run ----------------------------------------------------------------------------------


def served_limits(project: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The served model's `serving` limits (the project's params, which the model's params
    snapshot copied at `dvc repro`, with the serve-time `overrides`) and `fetch.max_pixels`."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    return {**params["serving"], **overrides}, int(params["fetch"]["max_pixels"])


def good_inputs(project: Path) -> tuple[int, str, str, str]:
    """(sample_id, text, image base64, where the image came from) from the project's test CSV."""
    rows = demo_rows(project)
    with_image = rows[rows["image_b64"].notna()]
    first = rows.iloc[0]
    if len(with_image):
        row = with_image.iloc[0]
        return int(first["sample_id"]), str(first["catalog_content"]), row["image_b64"], "test CSV"
    return int(first["sample_id"]), str(first["catalog_content"]), jpeg_b64(300, 300), "generated"


def probe_links(session: requests.Session, url: str, ok_link: str, timeout: float) -> str:
    """The image_status of one row linking the image server's /ok.jpg (or the HTTP status)."""
    body = Body("probe", split_body(rows_frame(1, SHORT_TEXT, image_link=[ok_link])), JSON, 1)
    record = send(session, url, body, timeout)
    if record.status != "200":
        return f"HTTP {record.status}"
    return record.image_statuses[0] if record.image_statuses else "no image_status"


def server_alive(server: Server) -> bool:
    if server.proc.poll() is not None:
        return False
    try:
        return requests.get(f"{server.url}/ping", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def run_load(
    url: str,
    good: list[Body],
    hostile: list[Body],
    clients: int,
    seconds: float,
    timeout: float,
    progress: Callable[[str], None] = print,
) -> list[Record]:
    """Half the clients (at least one) send `good` in turn; the others cycle through `hostile`,
    each from its own offset. Returns every request's record."""
    n_good = max(1, clients // 2)
    n_hostile = clients - n_good if hostile else 0
    records: list[Record] = []
    stop = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client, args=(url, good, i, stop, timeout, records), daemon=True)
        for i in range(n_good)
    ]
    step = max(len(hostile) // max(n_hostile, 1), 1)
    threads += [
        threading.Thread(
            target=client, args=(url, hostile, i * step, stop, timeout, records), daemon=True
        )
        for i in range(n_hostile)
    ]
    progress(f"clients: {n_good} good, {n_hostile} hostile, for {seconds:g} s "
             f"(client timeout {timeout:g} s)")  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def report(
    summary: dict[str, Any],
    memory: MemorySampler,
    stayed_up: bool,
    after: str,
    fetches: tuple[int, int],
    bound: int,
    hang_reaches_fetch: bool,
) -> tuple[bool, list[str]]:
    good = summary["good_by_kind"]
    why = f" ({counts_text(summary['error_statuses'])})" if summary["errors"] else ""
    print(f"\ngood requests: {summary['good']} (text-only {good['good_text']}, with image "
          f"{good['good_image']}); errors {summary['errors']}{why}")  # fmt: skip
    print(f"good latency (answered 200): p50 {summary['p50_ms']:.1f} ms, p99 "
          f"{summary['p99_ms']:.1f} ms, max {summary['max_ms']:.1f} ms")  # fmt: skip
    print(f"good image rows' image_status: {counts_text(summary['good_images']) or '-'}")
    print("hostile requests by kind (HTTP status x count, median s) | expected:")
    for kind, entry in summary["hostile"].items():
        answers = ", ".join(
            f"{status} x{n} ({entry['seconds'][status]:.2f} s)"
            for status, n in entry["statuses"].most_common()
        )
        print(f"  {kind:<22}{answers}  | {EXPECTED.get(kind, '')}")
        if entry["images"]:
            print(f"  {'':<22}image_status: {counts_text(entry['images'], 200)}")
    peak_gib = memory.peak_rss / GIB
    memory_ok = peak_gib <= MEMORY_CEILING_GIB
    print(f"peak RSS of the served process tree: {peak_gib:.2f} GiB (sum of VmRSS over up to "
          f"{memory.max_processes} processes, {memory.samples} samples every "
          f"{memory.interval:g} s); largest single-process VmHWM {memory.peak_hwm / GIB:.2f} GiB;"
          f" ceiling {MEMORY_CEILING_GIB:g} GiB: {'PASS' if memory_ok else 'FAIL'}")  # fmt: skip
    connections, gauge = fetches
    fetches_bounded = connections <= bound if hang_reaches_fetch else None
    shown = {True: "PASS", False: "FAIL", None: "not exercised (links refused before a fetch)"}
    print(f"image fetches open at once (the image server's ESTABLISHED connections): max "
          f"{connections}; bound {bound} (min(fetch_concurrency, fetch_per_host) x workers): "
          f"{shown[fetches_bounded]}; the image server's max_in_flight gauge: {gauge}")  # fmt: skip
    print(f"server stayed up: {'yes' if stayed_up else 'NO'} (process alive and /ping 200 after "
          f"the load); a good row after the load: {after}")  # fmt: skip
    return verdict(summary, peak_gib, stayed_up, fetches_bounded)


def results_tables(
    summary: dict[str, Any],
    memory: MemorySampler,
    stayed_up: bool,
    fetches: tuple[int, int],
    bound: int,
    args: argparse.Namespace,
) -> list[dict]:
    from benchmarks.results import table

    settings = (f"{args.clients} clients, {args.seconds:g} s, --workers {args.workers}, "
                f"--timeout {args.timeout}")  # fmt: skip
    figures = [
        ["good requests", summary["good"]],
        ["good requests failed (not 200 or no answer)", summary["errors"]],
        ["good latency p50 (ms)", summary["p50_ms"]],
        ["good latency p99 (ms)", summary["p99_ms"]],
        ["peak RSS of the served process tree (GiB)", memory.peak_rss / GIB],
        ["memory ceiling (GiB)", MEMORY_CEILING_GIB],
        ["largest single-process VmHWM (GiB)", memory.peak_hwm / GIB],
        ["server stayed up", stayed_up],
        ["image fetches open at once, most (ESTABLISHED connections)", fetches[0]],
        ["image fetches open at once, bound", bound],
    ]
    hostile = [
        [kind, status, n, entry["seconds"][status], counts_text(entry["images"], 60)]
        for kind, entry in summary["hostile"].items()
        for status, n in entry["statuses"].most_common()
    ]
    return [
        table(
            f"Good requests beside a hostile mix ({settings})",
            ["measure", "value"],
            figures,
            notes=f"limits: {json.dumps(args.limits) if args.limits else 'params.yaml'}",
        ),
        table(
            "Hostile requests by kind and answer",
            ["kind", "HTTP status", "requests", "median s", "rows' image_status"],
            hostile,
            formats=[None, None, None, ".2f", None],
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="a built project")
    parser.add_argument("--model", default=None, help="model URI (default: latest version)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long they send")
    parser.add_argument("--workers", type=int, default=1, help="mlflow models serve --workers")
    parser.add_argument("--timeout", type=int, default=60, help="mlflow models serve --timeout")
    parser.add_argument(
        "--limits",
        type=json.loads,
        default=None,
        help="serve-time serving limits, flat JSON (SERVING_MODEL_CONFIG)",
    )
    from benchmarks.results import add_results_option, write_results

    add_results_option(parser, "serve_load")
    args = parser.parse_args()
    if args.limits is not None and not isinstance(args.limits, dict):
        parser.error("--limits is a JSON object, e.g. '{\"max_rows\": 200}'")
    from tests.integration.faulty_server import FaultyServer, Route, synthetic_images

    project = args.project.resolve()
    model_uri = args.model or default_model(project)
    limits, image_max_pixels = served_limits(project, args.limits or {})
    client_timeout = args.timeout + CLIENT_MARGIN_S
    print(f"model {model_uri}; project {project}")
    config = json.dumps(args.limits) if args.limits else "(none: the params snapshot's limits)"
    print(f"settings: mlflow models serve -w {args.workers} -t {args.timeout} --env-manager "
          f"local; SERVING_MODEL_CONFIG {config}")  # fmt: skip
    shown = ("max_rows", "max_body_bytes", "request_seconds", "light_rows", "light_body_bytes",
             "heavy_requests", "queue_seconds", "request_threads", "max_request_pixels",
             "decode_seconds", "decode_workers", "fetch_concurrency", "fetch_per_host")  # fmt: skip
    print("limits: " + ", ".join(f"{k} {limits[k]}" for k in shown if k in limits))
    if float(limits["request_seconds"]) >= args.timeout - 1:
        print(f"note: --timeout {args.timeout} does not exceed serving.request_seconds "
              f"{limits['request_seconds']} by more than 1 s: the model's deadline is cut to "
              f"{args.timeout - 1} s")  # fmt: skip

    sample_id, text, image, image_from = good_inputs(project)
    small = next(iter(synthetic_images(1).values()))
    routes = {OK_PATH: Route(body=small), HANG_PATH: Route(body=small * 20, then="trickle")}
    lifetime = args.seconds + 3 * client_timeout + 900
    with FaultyServer(routes, lifetime=lifetime) as images:
        good = good_bodies(sample_id, text, image)
        hostile = hostile_bodies(text, limits, image_max_pixels, images.url(HANG_PATH))
        kinds = [body.kind for body in hostile]
        if "decode_bombs" not in kinds:
            print("note: tests.support.slow_decoding_image_b64 is missing: decode bombs skipped")
        sizes = ", ".join(f"{b.kind} {len(b.data) / 1e6:.2f} MB/{b.rows} rows" for b in hostile)
        print(f"good image: {image_from}; hostile bodies: {sizes}")
        server = Server(project, model_uri, args.workers, timeout=args.timeout,
                        env={"SERVING_MODEL_CONFIG": json.dumps(args.limits)} if args.limits
                        else None, log_name="serve-load.log")  # fmt: skip
        try:
            print(f"server startup (to /ping): {server.startup_s:.1f} s; log {server.log.name}")
            session = requests.Session()
            for body in good * 2:  # warm-up: lazy imports, the decoder processes' start
                send(session, server.url, body, client_timeout)
            link_status = probe_links(session, server.url, images.url(OK_PATH), client_timeout)
            hang_reaches_fetch = link_status == "ok"
            meaning = (
                "links to 127.0.0.1 are fetched: the hanging links reach a fetch"
                if hang_reaches_fetch
                else "links to 127.0.0.1 are not fetched: the hanging links are refused at once "
                "(build DIR with serving.image_hosts incl. 127.0.0.1 and trusted_networks "
                "127.0.0.0/8 to exercise them)"
            )
            print(f"image link probe: image_status {link_status!r}: {meaning}")
            images.max_in_flight = 0  # count the load's fetches only
            connections = PeakSampler(lambda: established(images.port))
            with MemorySampler(server.proc.pid) as memory, connections:
                records = run_load(
                    server.url, good, hostile, args.clients, args.seconds, client_timeout
                )
                stayed_up = server_alive(server)
                after = send(session, server.url, good[0], client_timeout).status
            fetches = (connections.peak, images.max_in_flight)
        finally:
            server.close()
    log_text = Path(server.log.name).read_text(errors="replace")
    print(f"server log: {server.log.name} ({log_text.count('Traceback')} tracebacks)")
    summary = summarize(records)
    bound = fetch_bound(limits, args.workers)
    passed, failed = report(summary, memory, stayed_up, after, fetches, bound, hang_reaches_fetch)
    peak = memory.peak_rss / GIB
    if passed:
        print(f"verdict: PASS: 0 errors on {summary['good']} good requests under the hostile "
              f"mix, peak RSS {peak:.2f} GiB <= {MEMORY_CEILING_GIB:g} GiB, the server stayed "
              "up")  # fmt: skip
    else:
        print(f"verdict: FAIL: {'; '.join(failed)}")
    if args.results:
        write_results(
            args.results, results_tables(summary, memory, stayed_up, fetches, bound, args)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
