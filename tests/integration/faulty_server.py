"""A real HTTP/1.1 server on 127.0.0.1 that serves images with scripted faults.

Why not mocks: retries, timeouts, truncation and connection resets only behave as in production
when real sockets carry them. Each path has a script (what its 1st, 2nd, ... request gets) and a
final behaviour, so a test knows the ground truth of every link, and the server counts the
requests per path, so a test can prove what was (not) downloaded again.

Used in-process by the tests (`with FaultyServer(routes) as server:`) and as a subprocess by the
benchmark (`python faulty_server.py --links N --images DIR`, prints `port <n>`). Both stop by
themselves after `lifetime` seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import socket
import ssl
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

# Behaviours a request can get. The expected manifest status of a link follows from its final
# behaviour (a scripted fault before it only costs attempts).
EXPECTED_STATUS = {
    "ok": "ok",
    "chunked": "ok",
    "redirect": "ok",
    "404": "missing",
    "403": "missing",
    "410": "missing",
    "html": "bad",
    "corrupt": "bad",
    "503": "failed",
    "429": "failed",
    "429-retry-after": "failed",
    "slow": "failed",
    "reset": "failed",
    "truncate": "failed",
    "truncate-unframed": "failed",
}
HTML_BODY = b"<!DOCTYPE html><html><head><title>Robot Check</title></head><body>" + b"x" * 600
HTML_BODY += b"</body></html>"


@dataclass(frozen=True)
class Route:
    """What one path serves: `script[i]` answers request i, `then` every later request."""

    body: bytes = b""
    content_type: str = "image/jpeg"
    script: tuple[str, ...] = ()
    then: str = "ok"
    redirect_to: str = ""
    retry_after: str = "1"

    def behaviour(self, index: int) -> str:
        return self.script[index] if index < len(self.script) else self.then

    @property
    def expected_status(self) -> str:
        return EXPECTED_STATUS[self.then]


class FaultyServer:
    """Threaded loopback server over `routes`; `counts` and `times` record every request."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        slow_seconds: float = 2.0,
        delay: float = 0.0,
        lifetime: float = 120.0,
        trickle_interval: float = 0.1,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.routes = dict(routes)
        self.slow_seconds = slow_seconds
        self.trickle_interval = trickle_interval
        self.delay = delay
        self.lifetime = lifetime
        self.counts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}
        self.in_flight = 0  # requests being answered now, and the most at once
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _handler_for(self))
        if tls is not None:  # HTTPS: the handshake runs in the handler thread
            self._httpd.socket = tls.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def record(self, path: str) -> int:
        """Count a request; returns its index for this path (0 for the first)."""
        with self._lock:
            index = self.counts[path]
            self.counts[path] += 1
            self.times.setdefault(path, []).append(time.monotonic())
            return index

    def entered(self, step: int) -> None:
        """One more (+1) or one fewer (-1) request being answered: the concurrency gauge."""
        with self._lock:
            self.in_flight += step
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def wait(self, seconds: float) -> bool:
        """Sleep that ends early when the server stops (slow responses must not block stop)."""
        return self._stopping.wait(seconds)

    def start(self) -> FaultyServer:
        serve = threading.Thread(  # a short poll: stop() returns in 50 ms, not 500
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        watchdog = threading.Thread(target=self._expire, daemon=True)
        self._threads = [serve, watchdog]
        for thread in self._threads:
            thread.start()
        return self

    def _expire(self) -> None:
        if not self._stopping.wait(self.lifetime):
            self.stop()

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FaultyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        """Faults break connections on purpose; their tracebacks are noise."""


def _handler_for(server: FaultyServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes
        owner: ClassVar[FaultyServer] = server

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/__counts":
                self._send(200, json.dumps(self.owner.snapshot()).encode(), "application/json")
                return
            route = self.owner.routes.get(path)
            index = self.owner.record(path)
            if route is None:
                self._send(404, b"not found", "text/plain")
                return
            self.owner.entered(+1)
            try:
                if self.owner.delay:
                    self.owner.wait(self.owner.delay)
                self._act(route, route.behaviour(index))
            finally:
                self.owner.entered(-1)

        def _act(self, route: Route, behaviour: str) -> None:
            if behaviour == "ok":
                self._send(200, route.body, route.content_type)
            elif behaviour in ("404", "403", "410", "503", "429"):
                self._send(int(behaviour), b"", "text/plain")
            elif behaviour == "429-retry-after":
                self._send(429, b"", "text/plain", {"Retry-After": route.retry_after})
            elif behaviour == "redirect":
                self._send(302, b"", "text/plain", {"Location": route.redirect_to})
            elif behaviour == "html":
                self._send(200, HTML_BODY, "text/html; charset=utf-8")
            elif behaviour == "corrupt":
                self._send(200, route.body[: len(route.body) // 2], route.content_type)
            elif behaviour == "slow":
                self.owner.wait(self.owner.slow_seconds)
                self._send(200, route.body, route.content_type)
            elif behaviour == "truncate":
                self._truncate(route, framed=True)
            elif behaviour == "truncate-unframed":
                self._truncate(route, framed=False)
            elif behaviour == "reset":
                self._reset()
            elif behaviour == "trickle":
                self._trickle(route)
            elif behaviour == "chunked":
                self._chunked(route)
            else:
                raise ValueError(f"unknown behaviour {behaviour!r}")

        def _send(
            self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
        ) -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _truncate(self, route: Route, framed: bool) -> None:
            """Half the body, then close: with Content-Length the client can tell; without
            (body delimited by the close) only decoding the image shows it."""
            self.send_response(200)
            self.send_header("Content-Type", route.content_type)
            if framed:
                self.send_header("Content-Length", str(len(route.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(route.body[: len(route.body) // 2])
            self.close_connection = True

        def _trickle(self, route: Route) -> None:
            """The body one byte per `trickle_interval`: each read succeeds well within a read
            timeout, so only a deadline on the whole response ends it."""
            self.send_response(200)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            try:
                for i in range(len(route.body)):
                    self.wfile.write(route.body[i : i + 1])
                    self.wfile.flush()
                    if self.owner.wait(self.owner.trickle_interval):
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def _chunked(self, route: Route) -> None:
            """The body in 4 KiB chunks (Transfer-Encoding: chunked, no Content-Length)."""
            self.send_response(200)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for start in range(0, len(route.body), 4096):
                    piece = route.body[start : start + 4096]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _reset(self) -> None:
            """Abort with a TCP RST before any response byte (SO_LINGER 0 + close)."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

    return Handler


# ---------------------------------------------------------------------------------------------
# Image bodies
# ---------------------------------------------------------------------------------------------


def synthetic_images(n: int, seed: int = 0) -> dict[str, bytes]:
    """Distinct JPEGs of varied sizes, for machines without the real image set."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images: dict[str, bytes] = {}
    for i in range(n):
        size = (rng.randint(120, 420), rng.randint(120, 420))
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
            box = (x0, y0, x0 + rng.randint(10, 120), y0 + rng.randint(10, 120))
            draw.rectangle(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        images[f"synthetic-{i:04d}.jpg"] = out.getvalue()
    return images


def load_images(directory: Path | None, n: int) -> dict[str, bytes]:
    """Up to `n` real images read in place from `directory`, else synthetic ones."""
    if directory is not None and directory.is_dir():
        names = sorted(p.name for p in directory.glob("*.jpg"))[:n]
        if names:
            return {name: (directory / name).read_bytes() for name in names}
    return synthetic_images(n)


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny valid-header PNG claiming width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def _main() -> None:
    """Serve `--links` paths /img/<i>.jpg (cycling over the images) until killed or expired."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--links", type=int, default=2000)
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--lifetime", type=float, default=600.0)
    args = parser.parse_args()
    bodies = list(load_images(args.images, 600).values())
    routes = {f"/img/{i}.jpg": Route(bodies[i % len(bodies)]) for i in range(args.links)}
    server = FaultyServer(routes, delay=args.delay, lifetime=args.lifetime).start()
    print(f"port {server.port}", flush=True)
    try:
        server._stopping.wait()
    except KeyboardInterrupt:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    _main()
