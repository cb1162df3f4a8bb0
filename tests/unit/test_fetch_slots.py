"""Process-wide fetch limits, name lookups within the deadline, and the caller's deadline.

Why a real loopback server that holds its answers: "at most N fetches open at once" is only
shown by a server that counts the connections it holds, while fetches from many threads (and
many policies) press on it. The handler blocks on an event the test sets, so a test controls
exactly how long fetches stay open, and never waits on a fixed sleep longer than it must.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from pricefuse.data.images import ImagePolicy, Refused, guarded_get, load_images
from pricefuse.data.images import source as source_module
from pricefuse.data.images.fetch_slots import (
    FetchSlots,
    ResolverBusy,
    ResolverPool,
    ResolverTimeout,
    shared_slots,
)
from tests.integration.faulty_server import synthetic_images
from tests.support import project_params

PARAMS = project_params()
JPEG = next(iter(synthetic_images(1).values()))
LOOPBACK = ("127.0.0.1/32",)
HOSTS = ("images.test", "a.test", "b.test", "slow.test")


class HoldingServer:
    """Loopback HTTP server: `/hold` answers once `release` is set (5 s at most), `/a.jpg` at
    once, `/to/<host>` redirects to `<host>`'s `/a.jpg`; open requests are counted, overall and
    per Host header, with the most seen at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.open = 0
        self.most_open = 0
        self.open_by_host: Counter[str] = Counter()
        self.most_by_host: Counter[str] = Counter()
        self.seen = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, path: str, host: str = "images.test") -> str:
        return f"http://{host}:{self.port}{path}"

    def wait_open(self, count: int, seconds: float = 3.0) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with self.lock:
                if self.open >= count:
                    return
            time.sleep(0.01)
        raise AssertionError(f"{count} requests never open at once (open: {self.open})")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                host = self.headers.get("Host", "").split(":")[0]
                with owner.lock:
                    owner.seen += 1
                    owner.open += 1
                    owner.most_open = max(owner.most_open, owner.open)
                    owner.open_by_host[host] += 1
                    owner.most_by_host[host] = max(
                        owner.most_by_host[host], owner.open_by_host[host]
                    )
                try:
                    if self.path.startswith("/to/"):
                        target = f"http://{self.path[4:]}:{owner.port}/a.jpg"
                        self._send(302, b"", {"Location": target})
                        return
                    if self.path == "/hold":
                        owner.release.wait(5.0)
                    self._send(200, JPEG, {"Content-Type": "image/jpeg"})
                finally:
                    with owner.lock:
                        owner.open -= 1
                        owner.open_by_host[host] -= 1

            def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(code)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        return Handler

    def __enter__(self) -> HoldingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def server() -> Iterator[HoldingServer]:
    with HoldingServer() as running:
        yield running


def loopback_names(host: str, port: int) -> list[str]:
    """Every test name resolves to the loopback server (trusted in these policies)."""
    return ["127.0.0.1"]


def policy(
    total: int,
    per_host: int,
    *,
    resolver: Callable[[str, int], list[str]] = loopback_names,
    **fetch: float,
) -> ImagePolicy:
    """A fresh ImagePolicy from params-like serving settings carrying the two limits, as the
    lead's `serving.fetch_concurrency` / `serving.fetch_per_host` will: each call is a new
    object, so sharing slots cannot come from sharing a policy."""
    serving = SimpleNamespace(
        **{
            **asdict(PARAMS.serving),
            "image_hosts": HOSTS,
            "trusted_networks": LOOPBACK,
            "allow_local_images": False,
            "fetch_concurrency": total,
            "fetch_per_host": per_host,
        }
    )
    return ImagePolicy.from_config(serving, replace(PARAMS.fetch, **fetch), resolver=resolver)


def in_threads(calls: list[Callable[[], Any]]) -> tuple[list[threading.Thread], list[Any]]:
    """Start each call on its own thread; results (or the Refused) land in the list."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Refused as refused:
            results[i] = refused.reason

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    return threads, results


def join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()


def assert_idle(slots: FetchSlots) -> None:
    assert slots.in_use() == (0, {}), "a fetch kept its slot"


# --- limits -----------------------------------------------------------------------------------


def test_the_limits_come_from_the_params_and_default_when_absent() -> None:
    rules = policy(5, 3)
    assert (rules.max_fetches, rules.max_fetches_per_host) == (5, 3)
    older = ImagePolicy.from_config(PARAMS.serving, PARAMS.fetch)  # params without the fields
    if not hasattr(PARAMS.serving, "fetch_concurrency"):
        assert (older.max_fetches, older.max_fetches_per_host) == (16, 4)
    assert policy(5, 3).slots is rules.slots is shared_slots(5, 3)
    assert policy(5, 2).slots is not rules.slots
    with pytest.raises(ValueError, match="at least 1"):
        policy(0, 1)


def test_total_fetches_are_limited_across_threads_and_policies(server: HoldingServer) -> None:
    """Four fetches from four threads, each with its own policy object built from the same
    limits (2 in all): the server never holds more than 2 open."""
    calls = [
        lambda: guarded_get(server.url("/hold"), policy(2, 4, connect_timeout=2, read_timeout=2))
        for _ in range(4)
    ]
    threads, results = in_threads(calls)
    server.wait_open(2)
    time.sleep(0.3)  # room for a third to arrive, had the limit been per policy
    assert (server.open, server.seen) == (2, 2)
    server.release.set()
    join(threads)
    assert results == [JPEG] * 4
    assert server.most_open == 2 and server.seen == 4
    assert_idle(shared_slots(2, 4))


def test_fetches_per_host_are_limited_across_threads(server: HoldingServer) -> None:
    """Three fetches to each of two hosts, 2 per host and 8 in all: 2 open to each, 4 open."""
    calls = [
        lambda host=host: guarded_get(
            server.url("/hold", host), policy(8, 2, connect_timeout=2, read_timeout=2)
        )
        for host in ("a.test", "b.test") * 3
    ]
    threads, results = in_threads(calls)
    server.wait_open(4)
    time.sleep(0.3)
    assert server.open_by_host == {"a.test": 2, "b.test": 2} and server.seen == 4
    server.release.set()
    join(threads)
    assert results == [JPEG] * 6
    assert server.most_by_host == {"a.test": 2, "b.test": 2} and server.seen == 6
    assert_idle(shared_slots(8, 2))


def test_a_fetch_without_a_slot_is_refused_at_its_deadline(server: HoldingServer) -> None:
    holder, results = in_threads(
        [lambda: guarded_get(server.url("/hold"), policy(1, 1, connect_timeout=2, read_timeout=2))]
    )
    server.wait_open(1)
    hurried = policy(1, 1, connect_timeout=0.25, read_timeout=0.25)  # a 0.5 s deadline
    started = time.monotonic()
    with pytest.raises(Refused) as refused:
        guarded_get(server.url("/a.jpg"), hurried)
    assert refused.value.reason == "fetch_busy"
    assert 0.45 < time.monotonic() - started < 0.8
    # the caller's deadline bounds the wait too, when it comes first
    patient = policy(1, 1, connect_timeout=2, read_timeout=2)
    started = time.monotonic()
    with pytest.raises(Refused) as refused:
        guarded_get(server.url("/a.jpg"), patient, deadline=started + 0.3)
    assert refused.value.reason == "fetch_busy"
    assert 0.25 < time.monotonic() - started < 0.6
    assert server.seen == 1  # neither reached the server
    server.release.set()
    join(holder)
    assert results == [JPEG]
    assert_idle(shared_slots(1, 1))


def test_a_redirect_keeps_its_slot_and_moves_its_host_slot(server: HoldingServer) -> None:
    """One slot in all: a redirect to another host still completes (it already holds the one
    slot), and never holds two host slots."""
    rules = policy(1, 1, connect_timeout=1, read_timeout=1)
    assert guarded_get(server.url("/to/b.test", "a.test"), rules) == JPEG
    assert server.seen == 2 and server.most_open == 1
    assert_idle(rules.slots)


def test_slots_never_exceed_their_limits_under_contention() -> None:
    """The slot table itself, hammered by 12 threads over 3 hosts with moves: never more than
    the limits held, everything given back."""
    slots = FetchSlots(3, 2)
    most: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        for round_ in range(20):
            lease = slots.acquire(f"h{(i + round_) % 3}", time.monotonic() + 5)
            assert lease is not None
            with lease:
                for _ in range(2):
                    open_, hosts = slots.in_use()
                    with lock:
                        most.append((open_, max(hosts.values())))
                    assert lease.move(f"h{(i + round_ + 1) % 3}", time.monotonic() + 5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    join(threads)
    assert max(o for o, _ in most) <= 3 and max(h for _, h in most) <= 2
    assert_idle(slots)


# --- name lookups -----------------------------------------------------------------------------


class StuckResolver:
    """A resolver that blocks for 10 s (as a hung system resolver would) unless `free` is set."""

    def __init__(self) -> None:
        self.free = threading.Event()
        self.calls = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        self.free.wait(10.0)
        return ["127.0.0.1"]


@pytest.fixture
def stuck() -> Iterator[StuckResolver]:
    resolver = StuckResolver()
    yield resolver
    resolver.free.set()  # the abandoned lookup threads end now, not in 10 s


def test_a_hung_lookup_is_refused_within_the_deadline(
    server: HoldingServer, stuck: StuckResolver
) -> None:
    rules = policy(7, 3, resolver=stuck, connect_timeout=0.25, read_timeout=0.25)
    started = time.monotonic()
    with pytest.raises(Refused) as refused:
        guarded_get(server.url("/a.jpg"), rules)
    assert refused.value.reason == "dns_timeout"
    assert time.monotonic() - started < 0.5 + 0.25
    assert server.seen == 0
    assert_idle(rules.slots)  # the fetch gave its slot back; only the lookup thread lingers


def test_a_hung_lookup_at_a_redirect_hop_is_refused_in_time(server: HoldingServer) -> None:
    free = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        if host == "slow.test":
            free.wait(10.0)
        return ["127.0.0.1"]

    rules = policy(7, 3, resolver=resolver, connect_timeout=0.25, read_timeout=0.25)
    started = time.monotonic()
    try:
        with pytest.raises(Refused) as refused:
            guarded_get(server.url("/to/slow.test"), rules)
    finally:
        free.set()
    assert refused.value.reason == "redirect_dns_timeout"
    assert time.monotonic() - started < 0.5 + 0.25


def test_stuck_lookups_are_bounded_and_then_refused_as_busy(
    server: HoldingServer, stuck: StuckResolver
) -> None:
    """With one slot, one resolver thread: while it is stuck on an abandoned lookup, the next
    fetch gets no lookup thread (and no new thread is made for it); once the lookup ends, it
    does."""
    hung = policy(1, 3, resolver=stuck, connect_timeout=0.15, read_timeout=0.15)
    with pytest.raises(Refused, match="dns_timeout"):
        guarded_get(server.url("/a.jpg"), hung)
    fine = policy(1, 3, connect_timeout=0.15, read_timeout=0.15)
    dns_threads = sum(t.name == "pricefuse-dns" for t in threading.enumerate())
    started = time.monotonic()
    with pytest.raises(Refused) as refused:
        guarded_get(server.url("/a.jpg"), fine)
    assert refused.value.reason == "dns_busy"
    assert time.monotonic() - started < 0.3 + 0.25
    assert sum(t.name == "pricefuse-dns" for t in threading.enumerate()) == dns_threads
    assert stuck.calls == 1 and server.seen == 0
    stuck.free.set()
    assert guarded_get(server.url("/a.jpg"), policy(1, 3, connect_timeout=1, read_timeout=1))


def test_the_resolver_pool_hands_back_results_errors_and_timeouts() -> None:
    pool = ResolverPool(1)
    soon = time.monotonic() + 1
    assert pool.run(lambda: ["1.2.3.4"], soon) == ["1.2.3.4"]

    def missing() -> list[str]:
        raise OSError("no such name")

    with pytest.raises(OSError, match="no such name"):
        pool.run(missing, soon)
    free = threading.Event()
    with pytest.raises(ResolverTimeout):
        pool.run(lambda: free.wait(10), time.monotonic() + 0.1)
    with pytest.raises(ResolverBusy):
        pool.run(lambda: [], time.monotonic() + 0.1)
    free.set()
    assert pool.run(lambda: ["5.6.7.8"], time.monotonic() + 1) == ["5.6.7.8"]


# --- the caller's deadline --------------------------------------------------------------------


def test_the_given_deadline_cuts_a_hanging_fetch(server: HoldingServer) -> None:
    """The policy would wait 4 s; the request's deadline says 0.4 s from now."""
    rules = policy(16, 4, connect_timeout=2, read_timeout=2)
    started = time.monotonic()
    with pytest.raises(Refused) as refused:
        guarded_get(server.url("/hold"), rules, deadline=started + 0.4)
    assert refused.value.reason == "timeout"
    assert 0.35 < time.monotonic() - started < 0.8
    assert server.seen == 1
    # a deadline already past starts nothing
    with pytest.raises(Refused, match="timeout"):
        guarded_get(server.url("/a.jpg"), rules, deadline=time.monotonic() - 1)
    assert server.seen == 1


def test_load_images_passes_the_deadline_down(server: HoldingServer) -> None:
    rules = policy(16, 4, connect_timeout=2, read_timeout=2)
    links = [server.url("/hold"), None, server.url("/hold")]
    started = time.monotonic()
    outcomes = load_images(links, [None] * 3, rules, deadline=started + 0.4)
    assert [outcome.status for outcome in outcomes] == ["timeout", "no_image", "timeout"]
    assert time.monotonic() - started < 0.8


def test_load_images_starts_only_the_workers_it_needs(
    server: HoldingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers: no more than rows with a source (blank and NaN are none), nor than the
    process-wide limit; a single source needs no pool at all."""
    started: list[int] = []
    real = source_module.ThreadPoolExecutor

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, max_workers: int, **kwargs: Any) -> None:
            started.append(max_workers)
            super().__init__(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(source_module, "ThreadPoolExecutor", Recording)
    image = server.url("/a.jpg")
    one = load_images([image, None, float("nan"), "  "], [None, "", None, None], policy(16, 4))
    assert [o.status for o in one] == ["ok", "no_image", "no_image", "no_image"]
    assert started == []
    rows = [image, float("nan"), image, " ", image]
    two = load_images(rows, [None] * 5, policy(16, 4))
    assert [o.status for o in two] == ["ok", "no_image", "ok", "no_image", "ok"]
    assert started == [min(3, PARAMS.fetch.per_host)]
    load_images([image] * 6, [None] * 6, policy(2, 2))
    assert started[-1] == min(2, PARAMS.fetch.per_host)
