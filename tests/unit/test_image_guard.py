"""Served image links against real loopback servers: what is refused, and what is used.

Why real servers: redirects, trickling bodies, chunked bodies and TLS only behave as in
production when real sockets carry them. Allow-listed names reach the loopback server through
an injected resolver (the one seam), while a server's request counts prove what was never asked.
"""

from __future__ import annotations

import datetime
import io
import ssl
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pricefuse.data.images import (
    ImageOutcome,
    ImagePolicy,
    image_columns,
    load_image_source,
    load_images,
)
from pricefuse.serving.limits import RequestLimits
from pricefuse.serving.model import PriceEnsembleModel, model_signature
from tests.integration.faulty_server import FaultyServer, Route, synthetic_images
from tests.support import project_params

PARAMS = project_params()
JPEG = next(iter(synthetic_images(1).values()))
LOOPBACK = ("127.0.0.1/32",)


def policy(
    hosts: tuple[str, ...] = ("images.test",),
    *,
    trusted: tuple[str, ...] = (),
    allow_local: bool = False,
    names: dict[str, list[str]] | None = None,
    ca_certs: str | None = None,
    **fetch: float,
) -> ImagePolicy:
    """params.yaml's serving policy with these hosts; `names` maps names to addresses (others
    go to the system resolver), `fetch` changes the fetch limits."""
    serving = replace(
        PARAMS.serving,
        image_hosts=hosts,
        trusted_networks=trusted,
        allow_local_images=allow_local,
    )
    seams: dict = {"ca_certs": ca_certs}
    if names is not None:
        seams["resolver"] = Resolver(names)
    return ImagePolicy.from_config(serving, replace(PARAMS.fetch, **fetch), **seams)


class Resolver:
    """Maps names to addresses and counts lookups (a pinned fetch looks a name up once)."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return self.names[host]


@pytest.fixture
def server() -> Iterator[FaultyServer]:
    routes = {
        "/a.jpg": Route(JPEG),
        "/chunked.jpg": Route(JPEG, then="chunked"),
        "/trickle.jpg": Route(JPEG, then="trickle"),
        "/slow.jpg": Route(JPEG, then="slow"),
        "/html": Route(then="html"),
        "/gone.jpg": Route(then="404"),
    }
    with FaultyServer(routes, slow_seconds=5.0, trickle_interval=0.05, lifetime=60) as running:
        yield running


def trusted_loopback(**fetch: float) -> ImagePolicy:
    """images.test -> 127.0.0.1, and loopback trusted: the only way a test image is fetched."""
    return policy(trusted=LOOPBACK, names={"images.test": ["127.0.0.1"]}, **fetch)


def status(link: str, rules: ImagePolicy) -> str:
    outcome = load_image_source(link, policy=rules)
    assert outcome.used == (outcome.status == "ok")
    return outcome.status


# --- used -----------------------------------------------------------------------------------


def test_allow_listed_image_is_fetched_from_the_checked_address(server: FaultyServer) -> None:
    rules = trusted_loopback()
    outcome = load_image_source(f"http://images.test:{server.port}/a.jpg", policy=rules)
    assert outcome.status == "ok" and outcome.image is not None
    assert outcome.image.size == Image.open(io.BytesIO(JPEG)).size
    # one lookup: the connection went to the address checked (the system resolver does not
    # even know images.test), so a second answer could not swap it
    assert rules.resolver.calls == ["images.test"]
    assert server.snapshot()["/a.jpg"] == 1
    # chunked bodies (no Content-Length) are read and counted too
    assert status(f"http://images.test:{server.port}/chunked.jpg", rules) == "ok"


def test_rows_say_whether_their_image_was_used(server: FaultyServer) -> None:
    links = [f"http://images.test:{server.port}/a.jpg", None, f"http://127.0.0.1:{server.port}/a"]
    outcomes = load_images(links, [None] * 3, trusted_loopback())
    assert image_columns(outcomes) == {
        "image_used": [True, False, False],
        "image_status": ["ok", "no_image", "host_not_allowed"],
    }


def test_served_output_carries_the_image_columns(server: FaultyServer) -> None:
    """The pyfunc's `predict` with its pricing replaced (encoders and members are not what this
    checks): the images it prices with and the columns it answers with."""
    model = PriceEnsembleModel()
    model.image_policy = trusted_loopback()
    model.params = PARAMS
    model.limits = RequestLimits.from_config(PARAMS.serving)
    model.decoder = None  # decoded in this process
    priced: list[list] = []

    def predict_prices(
        rows: pd.DataFrame, images: list, level: float, watch: object, deadline: object
    ) -> pd.DataFrame:
        priced.append(list(images))
        price = np.full(len(rows), 9.5)
        return pd.DataFrame({"price": price, "price_low": price / 2, "price_high": price * 2})

    model.predict_prices = predict_prices  # type: ignore[method-assign]
    rows = pd.DataFrame(
        {
            "sample_id": [7, 8, 9],
            "catalog_content": ["Item Name: tea"] * 3,
            "image_link": [
                f"http://images.test:{server.port}/a.jpg",
                f"http://images.test:{server.port}/gone.jpg",
                "/etc/hostname",
            ],
        }
    )
    out = model.predict(None, rows)
    assert list(out.columns) == [
        "sample_id",
        "price",
        "price_low",
        "price_high",
        "image_used",
        "image_status",
    ]
    assert out["image_used"].tolist() == [True, False, False]
    assert out["image_status"].tolist() == ["ok", "http_404", "local_path_refused"]
    assert [image is not None for image in priced[0]] == [True, False, False]
    outputs = [column.name for column in model_signature(0.8).outputs.inputs]
    assert outputs == ["price", "price_low", "price_high", "image_used", "image_status"]


# --- refused: addresses ---------------------------------------------------------------------


def test_loopback_is_refused_before_any_request(server: FaultyServer) -> None:
    rules = policy(("127.0.0.1", "localhost"))  # allow-listed, but resolving to loopback
    assert status(f"http://127.0.0.1:{server.port}/a.jpg", rules) == "private_address"
    assert status(f"http://localhost:{server.port}/a.jpg", rules) == "private_address"
    assert server.snapshot() == {}


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "017700000001"])
def test_numeric_spellings_of_loopback_are_refused(server: FaultyServer, host: str) -> None:
    """inet_aton reads these as 127.0.0.1; the check is on the resolved address, not the text."""
    assert status(f"http://{host}:{server.port}/a.jpg", policy((host,))) == "private_address"
    assert server.snapshot() == {}


@pytest.mark.parametrize(
    "addresses",
    [
        ["10.0.0.5"],
        ["192.168.1.7"],
        ["172.16.3.4"],
        ["169.254.169.254"],  # cloud metadata
        ["100.64.0.1"],  # shared address space
        ["0.0.0.0"],
        ["224.0.0.1"],
        ["240.0.0.1"],
        ["::1"],
        ["fe80::1"],
        ["fd00::1"],
        ["ff02::1"],
        ["::ffff:127.0.0.1"],  # IPv4-mapped IPv6
        ["::ffff:169.254.169.254"],
        ["93.184.216.34", "10.0.0.5"],  # one internal address is enough
    ],
)
def test_private_ranges_are_refused_without_connecting(addresses: list[str]) -> None:
    # Had it connected, the public address (no network here) would fail or time out instead.
    rules = policy(names={"images.test": addresses}, connect_timeout=0.3, read_timeout=0.3)
    assert status("http://images.test/a.jpg", rules) == "private_address"


def test_public_addresses_pass_and_trusted_networks_open_a_range() -> None:
    rules = policy(trusted=("10.1.0.0/16",))
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:8.8.8.8"):
        assert rules.address_allowed(address), address
    assert rules.address_allowed("10.1.2.3") and not rules.address_allowed("10.2.0.1")
    with pytest.raises(ValueError, match="not a CIDR"):
        policy(trusted=("10.0.0.0/33",))


# --- refused: URLs and hosts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "reason"),
    [
        ("http://evil.test/a.jpg", "host_not_allowed"),
        ("http://images.test.evil.test/a.jpg", "host_not_allowed"),
        ("http://images.test@127.0.0.1/a.jpg", "userinfo_refused"),
        ("http://user:pw@images.test/a.jpg", "userinfo_refused"),
        ("http://127.0.0.1\\@images.test/a.jpg", "bad_url"),
        ("http://images.test:99999/a.jpg", "bad_url"),
        ("gopher://images.test/a.jpg", "scheme_refused"),
        ("data:image/jpeg;base64,AAAA", "scheme_refused"),
    ],
)
def test_url_tricks_are_refused(link: str, reason: str) -> None:
    assert status(link, policy(names={"images.test": ["93.184.216.34"]})) == reason


def test_wildcard_hosts_match_subdomains_only() -> None:
    rules = policy(("*.media-amazon.com",))
    assert rules.host_allowed("m.media-amazon.com")
    assert rules.host_allowed("images-na.ssl-images.media-amazon.com")
    assert not rules.host_allowed("media-amazon.com")
    assert not rules.host_allowed("evilmedia-amazon.com")


def test_local_paths_and_file_urls_need_the_param(tmp_path: Path) -> None:
    path = tmp_path / "on-the-server.jpg"
    path.write_bytes(JPEG)
    for link in (str(path), path.as_uri()):
        assert status(link, policy()) == "local_path_refused"
        assert status(link, policy(allow_local=True)) == "ok"


# --- refused: redirects ---------------------------------------------------------------------


def test_redirects_are_checked_at_every_hop(server: FaultyServer) -> None:
    """Linux routes all of 127.0.0.0/8 to loopback: trusting 127.0.0.1 alone, a redirect to
    127.0.0.2 is a redirect to an internal address."""
    port = server.port
    server.routes.update(
        {
            "/to-private": Route(then="redirect", redirect_to=f"http://127.0.0.2:{port}/a.jpg"),
            "/to-other-host": Route(then="redirect", redirect_to=f"http://localhost:{port}/a.jpg"),
            "/to-file": Route(then="redirect", redirect_to="file:///etc/hostname"),
            "/relative": Route(then="redirect", redirect_to="/a.jpg"),
            "/loop": Route(then="redirect", redirect_to="/loop"),
        }
    )
    rules = policy(("127.0.0.1", "127.0.0.2"), trusted=LOOPBACK, allow_local=True)
    base = f"http://127.0.0.1:{port}"
    assert status(f"{base}/to-private", rules) == "redirect_private_address"
    assert status(f"{base}/to-other-host", rules) == "redirect_host_not_allowed"
    assert status(f"{base}/to-file", rules) == "redirect_scheme_refused"
    assert server.snapshot().get("/a.jpg", 0) == 0  # none of them reached the image
    assert status(f"{base}/relative", rules) == "ok"
    assert status(f"{base}/loop", rules) == "too_many_redirects"
    assert server.snapshot()["/loop"] == 4  # the link and three redirects


# --- refused: bodies ------------------------------------------------------------------------


def test_oversized_bodies_are_refused(server: FaultyServer) -> None:
    small = trusted_loopback(max_bytes=len(JPEG) - 1)
    base = f"http://images.test:{server.port}"
    assert status(f"{base}/a.jpg", small) == "too_large"  # by its Content-Length
    assert status(f"{base}/chunked.jpg", small) == "too_large"  # by the bytes counted


def test_a_trickling_body_is_cut_at_the_deadline(server: FaultyServer) -> None:
    """One byte per 50 ms never trips a 0.4 s read timeout; the whole-fetch deadline
    (connect_timeout + read_timeout = 0.8 s) ends it."""
    rules = trusted_loopback(connect_timeout=0.4, read_timeout=0.4)
    started = time.monotonic()
    assert status(f"http://images.test:{server.port}/trickle.jpg", rules) == "timeout"
    assert 0.7 < time.monotonic() - started < 1.6


def test_slow_headers_time_out(server: FaultyServer) -> None:
    rules = trusted_loopback(connect_timeout=0.3, read_timeout=0.3)
    started = time.monotonic()
    assert status(f"http://images.test:{server.port}/slow.jpg", rules) == "timeout"
    assert time.monotonic() - started < 1.0


def test_errors_and_non_images_are_named(server: FaultyServer) -> None:
    rules = trusted_loopback()
    assert status(f"http://images.test:{server.port}/gone.jpg", rules) == "http_404"
    assert status(f"http://images.test:{server.port}/html", rules) == "not_an_image"
    closed = policy(trusted=LOOPBACK, names={"images.test": ["127.0.0.1"]})
    assert status("http://images.test:9/a.jpg", closed) == "connect_failed"
    outcome = load_image_source(b64="bm90IGFuIGltYWdl", policy=rules)  # "not an image"
    assert outcome == ImageOutcome(None, "not_an_image")


# --- https: pinned address, verified name ---------------------------------------------------


def _certificates(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for `name` it signed: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def subject(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def build(common: str, public: object, issuer: str, ca: bool) -> x509.CertificateBuilder:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject(common))
            .issuer_name(subject(issuer))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            return builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            ).add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
        return builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )

    ca_cert = build("pricefuse test CA", ca_key.public_key(), "pricefuse test CA", True)
    ca_cert = ca_cert.sign(ca_key, hashes.SHA256())
    cert = build(name, key.public_key(), "pricefuse test CA", False).sign(ca_key, hashes.SHA256())
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_https_connects_to_the_pinned_address_and_verifies_the_name(tmp_path: Path) -> None:
    ca, cert, key = _certificates(tmp_path, "images.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names = {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    with FaultyServer({"/a.jpg": Route(JPEG)}, tls=context, lifetime=30) as server:
        hosts = ("images.test", "other.test")
        rules = policy(hosts, trusted=LOOPBACK, names=names, ca_certs=str(ca))
        assert status(f"https://images.test:{server.port}/a.jpg", rules) == "ok"
        # the certificate names images.test: the same address under another name is refused
        assert status(f"https://other.test:{server.port}/a.jpg", rules) == "tls_error"
        # and the test CA is not trusted by default (certifi's bundle)
        default_ca = policy(hosts, trusted=LOOPBACK, names=names)
        assert status(f"https://images.test:{server.port}/a.jpg", default_ca) == "tls_error"
        assert server.snapshot() == {"/a.jpg": 1}
