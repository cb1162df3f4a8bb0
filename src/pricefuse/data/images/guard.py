"""Fetch one image for a request from a stranger, without letting the request reach inside.

Why: the served model fetches the `image_link` a request names. Left open, a POST naming
`http://127.0.0.1:<port>/admin`, a cloud metadata address or a path on the server's disk makes
the server request or read it for the caller (request forgery, file read). So a served image link
is fetched only when
- its scheme is http or https, it carries no `user@` part, and its host is on the allow-list
  (`serving.image_hosts`: exact names, or `*.example.com` for any subdomain of example.com);
- every address the host resolves to is public (not loopback, private, shared, link-local,
  multicast, reserved or unspecified; IPv4-mapped IPv6 is judged as its IPv4 address), unless it
  lies in a `serving.trusted_networks` CIDR;
- the connection goes to the address that was checked (pinned: no second lookup, so DNS
  rebinding cannot swap it; TLS still verifies the certificate for the host name);
- redirects are followed by hand, at most `MAX_REDIRECTS`, each hop checked as above;
- the body fits `fetch.max_bytes` (Content-Length checked before reading, streamed bytes counted),
  and the whole fetch, redirects included, ends within `fetch.connect_timeout +
  fetch.read_timeout` seconds, or earlier at a deadline the caller gives (its request's): a
  watchdog shuts the socket down at that deadline, so neither a body nor headers trickling in
  under the per-read timeout can hold a worker;
- at most `max_fetches` fetches are open at once in the whole process, and at most
  `max_fetches_per_host` to one host (`fetch_slots`: shared by every request and thread, since a
  limit per request multiplies with the requests in flight). A fetch waits for a slot only until
  its deadline, then is refused (`fetch_busy`); it holds its slot through its redirects.
Host names are only looked up once they pass the allow-list, so lookups only ever wait on hosts
the operator chose; and a lookup runs on one of a bounded set of resolver threads while the fetch
waits for it only until the deadline (`dns_timeout`; `dns_busy` when every resolver thread is
still stuck on earlier lookups), since the system resolver can block far longer than a fetch may
take and a thread stuck in it cannot be stopped.

Every refusal or failure is a short reason (`Refused.reason`), which serving reports per row.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pricefuse.core.config import FetchConfig, ServingConfig
from pricefuse.data.images.fetch_slots import (
    DEFAULT_MAX_FETCHES,
    DEFAULT_MAX_FETCHES_PER_HOST,
    FetchSlots,
    Lease,
    ResolverBusy,
    ResolverTimeout,
    shared_slots,
)
from pricefuse.data.images.http import USER_AGENT

MAX_REDIRECTS = 3
# A fetch whose slot comes with less time than this left is not started: it could only open a
# connection to drop it at once.
MIN_FETCH_SECONDS = 0.05
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 1 << 16

Resolver = Callable[[str, int], Sequence[str]]
_T = TypeVar("_T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(Exception):
    """An image source refused or failed; `reason` is the machine-readable status."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver, as a connection would use)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class ImagePolicy:
    """Where a served image may come from, and the limits on fetching it.

    Built from the params (`from_config`); `resolver` and `ca_certs` are seams for tests (an
    allow-listed name resolving to a chosen address; a test CA), None meaning certifi's bundle.
    `max_fetches` / `max_fetches_per_host` are process-wide limits (`slots`): every policy with
    the same two numbers shares one set of slots, whichever request or thread built it.
    """

    hosts: tuple[str, ...]
    allow_local: bool
    trusted_networks: tuple[Network, ...]
    fetch: FetchConfig
    resolver: Resolver = system_resolver
    ca_certs: str | None = None
    max_fetches: int = DEFAULT_MAX_FETCHES
    max_fetches_per_host: int = DEFAULT_MAX_FETCHES_PER_HOST

    def __post_init__(self) -> None:
        if self.max_fetches < 1 or self.max_fetches_per_host < 1:
            raise ValueError(
                "fetch limits must be at least 1: "
                f"max_fetches={self.max_fetches}, max_fetches_per_host={self.max_fetches_per_host}"
            )

    @classmethod
    def from_config(cls, serving: ServingConfig, fetch: FetchConfig, **seams: Any) -> ImagePolicy:
        """The policy params describe; a malformed CIDR in `trusted_networks` is an error.

        The fetch limits come from `serving.fetch_concurrency` / `serving.fetch_per_host`;
        `seams` may override them (the served model's limits as a server overrode them).
        """
        networks = []
        for cidr in serving.trusted_networks:
            try:
                networks.append(ipaddress.ip_network(str(cidr), strict=False))
            except ValueError as exc:
                raise ValueError(f"serving.trusted_networks: {cidr!r} is not a CIDR") from exc
        hosts = tuple(str(h).strip().lower().rstrip(".") for h in serving.image_hosts)
        limits: dict[str, Any] = {
            "max_fetches": int(serving.fetch_concurrency),
            "max_fetches_per_host": int(serving.fetch_per_host),
        }
        limits.update(seams)
        return cls(hosts, bool(serving.allow_local_images), tuple(networks), fetch, **limits)

    @property
    def deadline_seconds(self) -> float:
        """The most one image fetch (all hops) may take."""
        return self.fetch.connect_timeout + self.fetch.read_timeout

    @property
    def slots(self) -> FetchSlots:
        """The process's fetch slots (and resolver threads) for this policy's limits."""
        return shared_slots(self.max_fetches, self.max_fetches_per_host)

    def host_allowed(self, host: str) -> bool:
        for allowed in self.hosts:
            if allowed.startswith("*."):
                if host.endswith(allowed[1:]) and len(host) > len(allowed) - 1:
                    return True
            elif host == allowed:
                return True
        return False

    def address_allowed(self, text: str) -> bool:
        """Public, or inside a trusted network; anything unparsable is not allowed."""
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.trusted_networks):
            return True
        return address.is_global and not (
            address.is_loopback
            or address.is_private
            or address.is_link_local
            or address.is_multicast
            or address.is_reserved
            or address.is_unspecified
            or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
        )


@dataclass(frozen=True)
class _Target:
    """One checked hop: where to connect (pinned addresses) and what to ask for."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]
    path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True)
class _Link:
    """One hop's URL, parsed and allow-listed: everything a hop needs but its addresses."""

    scheme: str
    host: str
    port: int
    path: str


def _parse(url: str, policy: ImagePolicy) -> _Link:
    """The hop `url` names if its form and host are allowed (no lookup), or `Refused`."""
    if "\\" in url or any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise Refused("bad_url", "backslash, space or control character")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused("bad_url", str(exc)) from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused("scheme_refused", scheme)
    if "@" in parts.netloc:
        raise Refused("userinfo_refused")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise Refused("bad_url", "no host")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise Refused("bad_url", f"host {host!r}") from exc
    if not policy.host_allowed(host):
        raise Refused("host_not_allowed", host)
    port = port or (443 if scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Link(scheme, host, port, path)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _pin(link: _Link, policy: ImagePolicy, deadline: float) -> _Target:
    """`link` with the addresses its host resolves to, all of them allowed, or `Refused`.

    The lookup runs on one of the process's resolver threads and is waited on only until
    `deadline`: a stuck getaddrinfo cannot be interrupted, so it is left to end on its own thread
    (one of a bounded few) while the fetch is refused in time.
    """
    try:
        if _is_ip_literal(link.host):  # nothing to look up
            addresses: tuple[str, ...] = (link.host,)
        else:
            addresses = tuple(
                policy.slots.resolvers.run(lambda: policy.resolver(link.host, link.port), deadline)
            )
    except ResolverTimeout as exc:
        raise Refused("dns_timeout", f"{link.host}: {exc}") from exc
    except ResolverBusy as exc:
        raise Refused("dns_busy", f"{link.host}: {exc}") from exc
    except (OSError, UnicodeError) as exc:
        raise Refused("dns_failed", f"{link.host}: {exc}") from exc
    if not addresses:
        raise Refused("dns_failed", link.host)
    refused = [a for a in addresses if not policy.address_allowed(a)]
    if refused:  # any: a name must not be half public, half internal
        raise Refused("private_address", f"{link.host} -> {', '.join(refused)}")
    return _Target(link.scheme, link.host, link.port, addresses, link.path)


def check_url(url: str, policy: ImagePolicy, deadline: float | None = None) -> _Target:
    """The hop `url` names, or `Refused` saying why it may not be fetched; the lookup ends by
    `deadline` (a `time.monotonic()` value; default: the policy's fetch deadline from now)."""
    if deadline is None:
        deadline = time.monotonic() + policy.deadline_seconds
    return _pin(_parse(url, policy), policy, deadline)


def _at_hop(hop: int, check: Callable[..., _T], *args: Any) -> _T:
    """`check(*args)`, its refusal renamed `redirect_<reason>` past the first hop."""
    try:
        return check(*args)
    except Refused as refused:
        if hop:
            raise Refused(f"redirect_{refused.reason}", str(refused)) from refused
        raise


def guarded_get(url: str, policy: ImagePolicy, deadline: float | None = None) -> bytes:
    """The body of `url` under the policy (module docstring), or `Refused`.

    The fetch ends by the policy's deadline, or by `deadline` (a `time.monotonic()` value: the
    caller's request's own) when that comes first, whatever it is waiting on: a fetch slot, a
    name lookup, the connection or the body. A refusal at a redirect hop is reported as
    `redirect_<reason>`, so a row shows that its own link was fine but where it led was not;
    `fetch_busy` is not renamed, since it says the server was busy, not where the link led.
    """
    own = time.monotonic() + policy.deadline_seconds
    deadline = own if deadline is None else min(own, deadline)
    if deadline <= time.monotonic():  # nothing is started for a request that has given up
        raise Refused("timeout", "the deadline passed before the fetch began")
    lease: Lease | None = None
    try:
        for hop in range(MAX_REDIRECTS + 1):
            link = _at_hop(hop, _parse, url, policy)
            lease = _hold(policy.slots, lease, link.host, deadline)
            if deadline - time.monotonic() < MIN_FETCH_SECONDS:  # the slot came too late
                raise Refused("fetch_busy", f"a fetch slot for {link.host} came at the deadline")
            target = _at_hop(hop, _pin, link, policy, deadline)
            status, location, body = _exchange(target, policy, deadline)
            if status == 200:
                return body
            if status not in _REDIRECTS:
                raise Refused(f"http_{status}")
            if not location:
                raise Refused("redirect_without_location")
            url = urllib.parse.urljoin(url, location)
        raise Refused("too_many_redirects", f"more than {MAX_REDIRECTS}")
    finally:
        if lease is not None:
            lease.release()


def _hold(slots: FetchSlots, lease: Lease | None, host: str, deadline: float) -> Lease:
    """The fetch's slots for a hop to `host`: taken at the first hop, the host slot moved at a
    redirect; `fetch_busy` when none comes free by the deadline."""
    if lease is None:
        taken = slots.acquire(host, deadline)
        if taken is None:
            raise Refused("fetch_busy", f"no fetch slot for {host} (limit {slots.total} open)")
        return taken
    if not lease.move(host, deadline):
        raise Refused("fetch_busy", f"no fetch slot for {host} ({slots.per_host} open to it)")
    return lease


class _Watchdog:
    """Shuts a socket down at the deadline: a blocked connect-time handshake or read returns at
    once, whatever the per-read timeout would allow.

    It holds a duplicate of the descriptor because wrapping the socket in TLS detaches the
    original object; shutdown acts on the connection, so the duplicate ends it for both.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.fired = False
        self._dup = sock.dup()
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(OSError):
            self._dup.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._timer.cancel()
        self._dup.close()


def _exchange(target: _Target, policy: ImagePolicy, deadline: float) -> tuple[int, str, bytes]:
    """One GET to the pinned address: (status, Location, body when 200)."""
    import http.client
    import ssl

    sock = _connect(target, policy, deadline)
    watchdog = _Watchdog(sock, deadline - time.monotonic())
    conn = http.client.HTTPConnection(target.host, target.port)
    try:
        sock.settimeout(min(policy.fetch.read_timeout, max(deadline - time.monotonic(), 0.01)))
        if target.scheme == "https":
            import certifi

            context = ssl.create_default_context(cafile=policy.ca_certs or certifi.where())
            sock = context.wrap_socket(sock, server_hostname=target.host)  # verifies the name
        conn.sock = sock  # pinned: http.client never resolves or connects by itself here
        conn.request(
            "GET",
            target.path,
            headers={
                "Host": target.host_header,
                "User-Agent": USER_AGENT,
                "Accept": "image/*",
                "Accept-Encoding": "identity",
            },
        )
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location") or "", b""
        body = _read_body(response, policy.fetch.max_bytes)
        if watchdog.fired:  # the shutdown reads as an early end of the body
            raise Refused("timeout", f"body unfinished after {policy.deadline_seconds:g} s")
        declared = response.getheader("Content-Length")
        if declared is not None and len(body) != int(declared):
            raise Refused("connection_error", f"{len(body)} of {declared} bytes")
        return 200, "", body
    except Refused:
        raise
    except Exception as exc:
        if watchdog.fired or isinstance(exc, TimeoutError):
            raise Refused("timeout", str(exc)) from exc
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            raise Refused("tls_error", str(exc)) from exc
        raise Refused("connection_error", f"{type(exc).__name__}: {exc}") from exc
    finally:
        watchdog.close()
        conn.close()
        sock.close()


def _connect(target: _Target, policy: ImagePolicy, deadline: float) -> socket.socket:
    """A TCP connection to the first checked address that answers (never a name lookup)."""
    reason, detail = "connect_failed", "no address"
    for address in target.addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refused("timeout", "connecting")
        try:
            return socket.create_connection(
                (address, target.port), timeout=min(policy.fetch.connect_timeout, remaining)
            )
        except TimeoutError as exc:
            reason, detail = "timeout", f"{address}: {exc}"
        except OSError as exc:
            reason, detail = "connect_failed", f"{address}: {exc}"
    raise Refused(reason, detail)


def _read_body(response: Any, max_bytes: int) -> bytes:
    """The whole body, refusing one larger than `max_bytes` (declared or streamed)."""
    declared = response.getheader("Content-Length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError as exc:
            raise Refused("connection_error", f"Content-Length {declared!r}") from exc
        if length > max_bytes:
            raise Refused("too_large", f"Content-Length {declared}")
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read1(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise Refused("too_large", f"more than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
