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
  fetch.read_timeout` seconds: a watchdog shuts the socket down at that deadline, so neither a
  body nor headers trickling in under the per-read timeout can hold a worker.
Host names are only looked up once they pass the allow-list, so name resolution (bounded by the
system resolver, not by the deadline) only ever waits on hosts the operator chose.

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
from typing import Any

from pricefuse.core.config import FetchConfig, ServingConfig
from pricefuse.data.images.http import USER_AGENT

MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 1 << 16

Resolver = Callable[[str, int], Sequence[str]]
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
    """

    hosts: tuple[str, ...]
    allow_local: bool
    trusted_networks: tuple[Network, ...]
    fetch: FetchConfig
    resolver: Resolver = system_resolver
    ca_certs: str | None = None

    @classmethod
    def from_config(cls, serving: ServingConfig, fetch: FetchConfig, **seams: Any) -> ImagePolicy:
        """The policy params describe; a malformed CIDR in `trusted_networks` is an error."""
        networks = []
        for cidr in serving.trusted_networks:
            try:
                networks.append(ipaddress.ip_network(str(cidr), strict=False))
            except ValueError as exc:
                raise ValueError(f"serving.trusted_networks: {cidr!r} is not a CIDR") from exc
        hosts = tuple(str(h).strip().lower().rstrip(".") for h in serving.image_hosts)
        return cls(hosts, bool(serving.allow_local_images), tuple(networks), fetch, **seams)

    @property
    def deadline_seconds(self) -> float:
        """The most one image fetch (all hops) may take."""
        return self.fetch.connect_timeout + self.fetch.read_timeout

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


def check_url(url: str, policy: ImagePolicy) -> _Target:
    """The hop `url` names, or `Refused` saying why it may not be fetched."""
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
    try:
        addresses = tuple(policy.resolver(host, port))
    except (OSError, UnicodeError) as exc:
        raise Refused("dns_failed", f"{host}: {exc}") from exc
    if not addresses:
        raise Refused("dns_failed", host)
    refused = [a for a in addresses if not policy.address_allowed(a)]
    if refused:  # any: a name must not be half public, half internal
        raise Refused("private_address", f"{host} -> {', '.join(refused)}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, host, port, addresses, path)


def guarded_get(url: str, policy: ImagePolicy) -> bytes:
    """The body of `url` under the policy (module docstring), or `Refused`.

    A refusal at a redirect hop is reported as `redirect_<reason>`, so a row shows that its
    own link was fine but where it led was not.
    """
    deadline = time.monotonic() + policy.deadline_seconds
    for hop in range(MAX_REDIRECTS + 1):
        try:
            target = check_url(url, policy)
        except Refused as refused:
            if hop:
                raise Refused(f"redirect_{refused.reason}", str(refused)) from refused
            raise
        status, location, body = _exchange(target, policy, deadline)
        if status == 200:
            return body
        if status not in _REDIRECTS:
            raise Refused(f"http_{status}")
        if not location:
            raise Refused("redirect_without_location")
        url = urllib.parse.urljoin(url, location)
    raise Refused("too_many_redirects", f"more than {MAX_REDIRECTS}")


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
