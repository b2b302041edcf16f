"""SSRF-safe image URL fetching, against real HTTP servers on loopback addresses only."""

from __future__ import annotations

import gzip
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, image_bytes

from glmvision.core import urlfetch
from glmvision.core.config import load_settings
from glmvision.core.errors import APIError
from glmvision.core.urlfetch import (
    FetchPolicy,
    IPAddress,
    fetch_image,
    host_matches,
    is_address_allowed,
    is_url,
    normalize_pattern,
)

PNG = image_bytes()
BIG = bytes(range(256)) * 20  # 5120 bytes
SMALL_CAP = 1000


class RecordingServer(ThreadingHTTPServer):
    """Counts connections and records each request, so tests can prove nothing was dialled."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], stop: threading.Event) -> None:
        super().__init__(address, Handler)
        self.stop = stop
        self.other_url = ""
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = "image/png",
        length: int | None = -1,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(len(body) if length < 0 else length))
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.close_connection = True
        with self.server.lock:
            self.server.requests.append((self.path, dict(self.headers)))
        path = self.path.split("?", 1)[0]
        try:
            self.route(path)
        except OSError:
            pass  # the client hung up, as it should on refusals

    def route(self, path: str) -> None:
        stop = self.server.stop
        if path == "/img.png":
            self.reply(200, PNG, "image/png; charset=binary")
        elif path == "/page.html":
            self.reply(200, b"<html>hi</html>", "text/html; charset=utf-8")
        elif path == "/notype":
            self.reply(200, PNG, None)
        elif path == "/redirect":
            self.reply(302, content_type=None, headers=(("Location", "/img.png"),))
        elif path == "/redirect-nowhere":
            self.reply(302, content_type=None)
        elif path.startswith("/hops/"):
            left = int(path.rsplit("/", 1)[1])
            location = f"/hops/{left - 1}" if left > 0 else "/img.png"
            self.reply(307, content_type=None, headers=(("Location", location),))
        elif path == "/to-other":
            self.reply(301, content_type=None, headers=(("Location", self.server.other_url + "/img.png"),))
        elif path == "/to-utf8":
            raw_location = "/img.png?q=ü".encode().decode("latin-1")  # raw UTF-8 bytes on the wire
            self.reply(302, content_type=None, headers=(("Location", raw_location),))
        elif path == "/to-file":
            self.reply(302, content_type=None, headers=(("Location", "file:///etc/passwd"),))
        elif path == "/missing":
            self.send_error(404)
        elif path == "/big-length":
            self.reply(200, BIG)
        elif path == "/big-close":
            self.reply(200, BIG, length=None)
        elif path in ("/big-chunked", "/chunked"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            body = BIG if path == "/big-chunked" else PNG
            for start in range(0, len(body), 100):
                piece = body[start : start + 100]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/lie-short":
            self.reply(200, PNG[:10], length=len(PNG))
        elif path == "/lie-long":
            self.reply(200, BIG, length=100)
        elif path == "/gzip":
            self.reply(200, gzip.compress(PNG), headers=(("Content-Encoding", "gzip"),))
        elif path == "/gzip-bomb":
            self.reply(200, gzip.compress(b"\0" * 100_000), headers=(("Content-Encoding", "gzip"),))
        elif path == "/brotli":
            self.reply(200, PNG, headers=(("Content-Encoding", "br"),))
        elif path == "/drip":
            self.reply(200, content_type="image/png", length=None)
            for _ in range(50):  # at most 10 s, and only until the client hangs up or the server stops
                self.wfile.write(b"x")
                if stop.wait(0.2):
                    break
        elif path == "/silent":
            stop.wait(5)
        else:
            self.send_error(404)


@dataclass
class Servers:
    one: RecordingServer  # on 127.0.0.1
    two: RecordingServer  # on 127.0.0.2, same port
    port: int
    threads: list[threading.Thread] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def counts(self) -> tuple[int, int]:
        return self.one.connections, self.two.connections


def _bind_pair(stop: threading.Event) -> tuple[RecordingServer, RecordingServer]:
    for _ in range(20):
        one = RecordingServer(("127.0.0.1", 0), stop)
        try:
            two = RecordingServer(("127.0.0.2", one.server_address[1]), stop)
        except OSError:
            one.server_close()
            continue
        return one, two
    raise RuntimeError("could not bind 127.0.0.1 and 127.0.0.2 on one port")


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    stop = threading.Event()
    one, two = _bind_pair(stop)
    port = one.server_address[1]
    one.other_url = two.other_url = f"http://127.0.0.2:{port}"
    found = Servers(one, two, port)
    for server in (one, two):
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        found.threads.append(thread)
    yield found
    stop.set()
    for server in (one, two):
        server.shutdown()
        server.server_close()
    for thread in found.threads:
        thread.join(timeout=5)


def local_policy(**overrides: Any) -> FetchPolicy:
    """A policy for the loopback test servers: private addresses allowed, short timeout."""
    values: dict[str, Any] = {"domains": ("127.0.0.1",), "allow_private": True, "timeout": 5.0}
    values.update(overrides)
    return FetchPolicy(**values)


def fetch_error(url: str, policy: FetchPolicy, param: str = "image_url") -> APIError:
    with pytest.raises(APIError) as info:
        fetch_image(url, policy, param)
    assert info.value.param == param
    return info.value


def mapping_resolver(table: dict[str, list[str]], calls: list[str]) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


class OnlyFirstLoopbackIsPublic(FetchPolicy):
    """Treats 127.0.0.1 as a public address and everything else as private."""

    def address_allowed(self, address: IPAddress) -> bool:
        return str(address) == "127.0.0.1"


# --- pure functions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://example.com/a.png", True),
        ("https://example.com", True),
        ("  https://example.com/x  ", True),
        ("ftp://example.com/x", True),
        ("file:///etc/passwd", True),
        ("data:image/png;base64,iVBORw0KGgo=", False),
        ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB", False),
        ("/9j/4AAQSkZJRgABAQ==", False),
        ("example.com/a.png", False),
        ("", False),
    ],
)
def test_is_url(value: str, expected: bool) -> None:
    assert is_url(value) is expected


@pytest.mark.parametrize(
    ("host", "pattern", "expected"),
    [
        ("cdn.example.com", "cdn.example.com", True),
        ("CDN.Example.COM", "cdn.example.com", True),
        ("cdn.example.com", "CDN.EXAMPLE.COM", True),
        ("cdn.example.com.", "cdn.example.com", True),
        ("cdn.example.com", "cdn.example.com.", True),
        ("other.example.com", "cdn.example.com", False),
        ("a.example.com", "*.example.com", True),
        ("a.b.example.com", "*.example.com", True),
        ("example.com", "*.example.com", False),
        ("badexample.com", "*.example.com", False),
        ("example.com.evil.net", "*.example.com", False),
        ("anything.net", "*", True),
        ("10.0.0.1", "*", True),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.2", "127.0.0.1", False),
        ("::1", "[::1]", True),
        ("[0:0::1]", "::1", True),
        ("bücher.example", "xn--bcher-kva.example", True),
        ("xn--bcher-kva.example", "BÜCHER.example", True),
        ("a.bücher.example", "*.bücher.example", True),
        ("bucher.example", "bücher.example", False),
        ("0x7f.1", "127.0.0.1", False),
        ("2130706433", "*", False),
        ("exa mple.com", "*", False),
    ],
)
def test_host_matches(host: str, pattern: str, expected: bool) -> None:
    assert host_matches(host, pattern) is expected


@pytest.mark.parametrize("pattern", ["", "*.", "a*.example.com", "*.*.example.com", "*.127.0.0.1", "a b.com"])
def test_bad_domain_patterns_are_refused_at_construction(pattern: str) -> None:
    with pytest.raises(ValueError):
        normalize_pattern(pattern)
    with pytest.raises(ValueError):
        FetchPolicy(domains=(pattern,))


def test_patterns_are_normalised() -> None:
    policy = FetchPolicy(domains=(" CDN.Example.com. ", "*.BÜCHER.example", "[::1]", "*"))
    assert policy.domains == ("cdn.example.com", "*.xn--bcher-kva.example", "::1", "*")


def test_from_settings() -> None:
    settings = load_settings(
        {
            "GLMVISION_IMAGE_URL_DOMAINS": "cdn.example.com, *.example.org",
            "GLMVISION_IMAGE_URL_ALLOW_PRIVATE": "true",
            "GLMVISION_IMAGE_URL_MAX_MB": 0.5,
            "GLMVISION_IMAGE_URL_TIMEOUT": 2,
            "GLMVISION_IMAGE_URL_MAX_REDIRECTS": 0,
        }
    )
    policy = FetchPolicy.from_settings(settings)
    assert policy == FetchPolicy(
        domains=("cdn.example.com", "*.example.org"),
        allow_private=True,
        max_bytes=512 * 1024,
        timeout=2.0,
        max_redirects=0,
    )
    assert FetchPolicy.from_settings(load_settings()).domains == ()


# (address, allowed by default, allowed with allow_private)
ADDRESSES = [
    ("127.0.0.1", False, True),
    ("10.1.2.3", False, True),
    ("172.16.0.1", False, True),
    ("192.168.1.1", False, True),
    ("100.64.0.1", False, True),
    ("169.254.1.1", False, True),
    ("192.0.2.1", False, True),
    ("169.254.169.254", False, False),
    ("169.254.170.2", False, False),
    ("100.100.100.200", False, False),
    ("fd00:ec2::254", False, False),
    ("::ffff:169.254.169.254", False, False),
    ("0.0.0.0", False, False),
    ("0.1.2.3", False, False),
    ("224.0.0.1", False, False),
    ("239.255.255.250", False, False),
    ("255.255.255.255", False, False),
    ("::", False, False),
    ("ff02::1", False, False),
    ("::1", False, True),
    ("fe80::1", False, True),
    ("fe80::1%eth0", False, True),
    ("fc00::1", False, True),
    ("::ffff:10.0.0.1", False, True),
    ("::ffff:127.0.0.1", False, True),
    ("::127.0.0.1", False, True),
    ("64:ff9b::a00:1", False, True),
    ("64:ff9b::a9fe:a9fe", False, False),
    ("2002:0a00:0001::", False, True),
    ("2002:a9fe:a9fe::", False, False),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False, True),  # Teredo, client 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:5601:5601", False, False),  # Teredo, client 169.254.169.254
    ("8.8.8.8", True, True),
    ("1.1.1.1", True, True),
    ("::ffff:8.8.8.8", True, True),
    ("2002:0808:0808::1", True, True),
    ("2606:4700::1111", True, True),
]


@pytest.mark.parametrize(("address", "default", "private"), ADDRESSES)
def test_address_classification(address: str, default: bool, private: bool) -> None:
    assert is_address_allowed(address) is default
    assert is_address_allowed(address, allow_private=False) is default
    assert is_address_allowed(address, allow_private=True) is private
    assert FetchPolicy(domains=("*",), allow_private=True).address_allowed(address) is private  # type: ignore[arg-type]


# --- fetching from real loopback servers ---------------------------------------------------------------


def test_fetch_returns_the_image_bytes(servers: Servers) -> None:
    assert fetch_image(servers.url("/img.png"), local_policy()) == PNG
    path, headers = servers.one.requests[-1]
    assert path == "/img.png"
    assert headers["Host"] == f"127.0.0.1:{servers.port}"
    assert headers["User-Agent"] == "glmvision"
    assert headers["Accept-Encoding"] == "identity"


def test_fetch_chunked_body(servers: Servers) -> None:
    assert fetch_image(servers.url("/chunked"), local_policy()) == PNG


def test_non_ascii_path_is_percent_encoded(servers: Servers) -> None:
    assert fetch_image(servers.url("/img.png?q=ü"), local_policy()) == PNG
    assert servers.one.requests[-1][0] == "/img.png?q=%C3%BC"


def test_raw_utf8_redirect_location(servers: Servers) -> None:
    assert fetch_image(servers.url("/to-utf8"), local_policy()) == PNG
    assert servers.one.requests[-1][0] == "/img.png?q=%C3%BC"


def test_disabled_makes_no_connection(servers: Servers) -> None:
    before = servers.counts()
    error = fetch_error(servers.url("/img.png"), local_policy(domains=()), param="messages[0]")
    assert (error.code, error.error_code) == (400, "image_url_disabled")
    assert servers.counts() == before


def test_domain_not_allowed_makes_no_connection(servers: Servers) -> None:
    before = servers.counts()
    error = fetch_error(
        servers.url("/img.png"), local_policy(domains=("cdn.example.com", "*.127.0.0.1.test"))
    )
    assert error.error_code == "image_url_domain_not_allowed"
    assert servers.counts() == before


def test_private_address_refused_by_default(servers: Servers) -> None:
    before = servers.counts()
    for url in (
        servers.url("/img.png"),
        servers.url("/img.png", host="[::1]"),
        servers.url("/img.png", host="[::ffff:127.0.0.1]"),
    ):
        error = fetch_error(url, FetchPolicy(domains=("*",)))
        assert error.error_code == "image_url_blocked"
        assert "resolves to" in error.description
    assert servers.counts() == before


def test_name_resolving_to_private_address_refused(servers: Servers) -> None:
    before = servers.counts()
    calls: list[str] = []
    resolve = mapping_resolver({"localhost": ["127.0.0.1"]}, calls)
    error = fetch_error(
        servers.url("/img.png", host="localhost"), FetchPolicy(domains=("*",), resolver=resolve)
    )
    assert error.error_code == "image_url_blocked"
    assert "127.0.0.1" not in error.description  # the client never sent that address
    assert calls == ["localhost"]
    assert servers.counts() == before


def test_one_refused_address_refuses_the_host(servers: Servers) -> None:
    # Loopback only: the policy calls 127.0.0.1 public, so a bug that picked it would still stay local.
    before = servers.counts()
    calls: list[str] = []
    resolve = mapping_resolver({"mixed.test": ["127.0.0.1", "127.0.0.2"]}, calls)
    policy = OnlyFirstLoopbackIsPublic(domains=("*",), resolver=resolve, timeout=5.0)
    assert fetch_error(servers.url("/img.png", host="mixed.test"), policy).error_code == "image_url_blocked"
    assert calls == ["mixed.test"]
    assert servers.counts() == before


def test_redirect_is_followed(servers: Servers) -> None:
    assert fetch_image(servers.url("/redirect"), local_policy()) == PNG
    assert [path for path, _ in servers.one.requests[-2:]] == ["/redirect", "/img.png"]


def test_redirect_to_another_allowed_host(servers: Servers) -> None:
    before_two = servers.two.connections
    policy = local_policy(domains=("127.0.0.1", "127.0.0.2"))
    assert fetch_image(servers.url("/to-other"), policy) == PNG
    assert servers.two.connections == before_two + 1


def test_redirect_to_host_outside_domains_refused(servers: Servers) -> None:
    before_two = servers.two.connections
    error = fetch_error(servers.url("/to-other"), local_policy())
    assert error.error_code == "image_url_domain_not_allowed"
    assert "127.0.0.2" not in error.description
    assert servers.two.connections == before_two


def test_redirect_to_private_address_refused(servers: Servers) -> None:
    before_one, before_two = servers.counts()
    policy = OnlyFirstLoopbackIsPublic(domains=("*",), timeout=5.0)
    assert fetch_image(servers.url("/img.png"), policy) == PNG
    error = fetch_error(servers.url("/to-other"), policy)
    assert error.error_code == "image_url_blocked"
    assert servers.counts() == (before_one + 2, before_two)


def test_redirect_to_other_scheme_refused(servers: Servers) -> None:
    error = fetch_error(servers.url("/to-file"), local_policy())
    assert error.error_code == "image_url_invalid"


def test_redirect_cap(servers: Servers) -> None:
    policy = local_policy(max_redirects=3)
    assert fetch_image(servers.url("/hops/2"), policy) == PNG  # three redirects
    assert fetch_error(servers.url("/hops/3"), policy).error_code == "image_url_too_many_redirects"
    no_redirects = local_policy(max_redirects=0)
    assert fetch_error(servers.url("/redirect"), no_redirects).error_code == "image_url_too_many_redirects"


def test_redirect_without_location(servers: Servers) -> None:
    assert (
        fetch_error(servers.url("/redirect-nowhere"), local_policy()).error_code
        == "image_url_upstream_status"
    )


def test_dns_pinning_and_host_header(servers: Servers) -> None:
    answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(f"{host}:{port}")
        return next(answers)

    before_one, before_two = servers.counts()
    policy = local_policy(domains=("images.test",), resolver=rebinding)
    assert fetch_image(servers.url("/img.png", host="images.test"), policy) == PNG
    assert calls == [f"images.test:{servers.port}"]
    assert servers.counts() == (before_one + 1, before_two)
    assert servers.one.requests[-1][1]["Host"] == f"images.test:{servers.port}"


def test_resolver_called_once_per_hop(servers: Servers) -> None:
    calls: list[str] = []
    policy = local_policy(
        domains=("images.test",), resolver=mapping_resolver({"images.test": ["127.0.0.1"]}, calls)
    )
    assert fetch_image(servers.url("/redirect", host="images.test"), policy) == PNG
    assert calls == ["images.test", "images.test"]


def test_idna_host(servers: Servers) -> None:
    calls: list[str] = []
    resolve = mapping_resolver({"xn--bcher-kva.test": ["127.0.0.1"]}, calls)
    policy = local_policy(domains=("bücher.test",), resolver=resolve)
    assert fetch_image(servers.url("/img.png", host="BÜCHER.test"), policy) == PNG
    assert servers.one.requests[-1][1]["Host"] == f"xn--bcher-kva.test:{servers.port}"


def test_upstream_status(servers: Servers) -> None:
    error = fetch_error(servers.url("/missing"), local_policy())
    assert error.error_code == "image_url_upstream_status"
    assert "404" in error.description


@pytest.mark.parametrize("path", ["/page.html", "/notype"])
def test_not_an_image(servers: Servers, path: str) -> None:
    assert fetch_error(servers.url(path), local_policy()).error_code == "image_url_not_image"


@pytest.mark.parametrize("path", ["/big-length", "/big-close", "/big-chunked", "/gzip-bomb"])
def test_too_large(servers: Servers, path: str) -> None:
    error = fetch_error(servers.url(path), local_policy(max_bytes=SMALL_CAP))
    assert (error.code, error.error_code) == (413, "image_url_too_large")


@pytest.mark.parametrize("path", ["/big-length", "/big-close", "/big-chunked"])
def test_body_exactly_at_the_cap_is_accepted(servers: Servers, path: str) -> None:
    assert fetch_image(servers.url(path), local_policy(max_bytes=len(BIG))) == BIG
    error = fetch_error(servers.url(path), local_policy(max_bytes=len(BIG) - 1))
    assert error.error_code == "image_url_too_large"


def test_content_length_lies(servers: Servers) -> None:
    assert fetch_error(servers.url("/lie-short"), local_policy()).error_code == "image_url_unreachable"
    # A server that sends more than it declared gets read only as far as it declared.
    assert fetch_image(servers.url("/lie-long"), local_policy(max_bytes=SMALL_CAP)) == BIG[:100]


def test_content_encodings(servers: Servers) -> None:
    assert fetch_image(servers.url("/gzip"), local_policy()) == PNG
    assert fetch_error(servers.url("/brotli"), local_policy()).error_code == "image_url_unreachable"


def test_slow_drip_times_out(servers: Servers) -> None:
    assert fetch_error(servers.url("/drip"), local_policy(timeout=1.0)).error_code == "image_url_timeout"


def test_silent_server_times_out(servers: Servers) -> None:
    assert fetch_error(servers.url("/silent"), local_policy(timeout=0.5)).error_code == "image_url_timeout"


def test_slow_resolver_times_out(servers: Servers) -> None:
    release = threading.Event()

    def slow(host: str, port: int) -> list[str]:
        release.wait(5)
        return ["127.0.0.1"]

    try:
        policy = local_policy(domains=("*",), resolver=slow, timeout=0.3)
        assert (
            fetch_error(servers.url("/img.png", host="slow.test"), policy).error_code == "image_url_timeout"
        )
    finally:
        release.set()


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/img.png",
        "gopher://127.0.0.1:70/_x",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "//127.0.0.1/img.png",
        "127.0.0.1/img.png",
        "http:///img.png",
        "http://",
        "http://user:pass@127.0.0.1/img.png",
        "http://user@127.0.0.1/img.png",
        "http://127.0.0.1:80@127.0.0.1/img.png",
        "http://127.0.0.1:0/img.png",
        "http://127.0.0.1:65536/img.png",
        "http://127.0.0.1:99999999/img.png",
        "http://127.0.0.1:-1/img.png",
        "http://127.0.0.1:+80/img.png",
        "http://127.0.0.1:8o/img.png",
        "http://127.0.0.1:80:80/img.png",
        "http://127.0.0.1:\u0668\u0660/img.png",
        "http://2130706433/img.png",
        "http://0x7f.1/img.png",
        "http://0177.0.0.1/img.png",
        "http://127.1/img.png",
        "http://127.0.0.01/img.png",
        "http://1.2.3.4.5/img.png",
        "http://[127.0.0.1]/img.png",
        "http://[::1/img.png",
        "http://[fe80::1%25lo]/img.png",
        "http://[::1]x/img.png",
        "http://exa mple.com/img.png",
        "http://example.com/a b.png",
        "http://example.com/\r\nX-Injected: 1",
        "http://exa\tmple.com/img.png",
        "http://ex%61mple.com/img.png",
        "http://a..b/img.png",
        "http://-a.example/img.png",
        "http://a_b$.example/img.png",
        "http://" + "a" * 64 + ".example/img.png",
        "http://example.com/" + "a" * 9000,
        "http://example.com/\ud800.png",
        "http://\ud800.example/img.png",
    ],
)
def test_invalid_urls(url: str) -> None:
    calls: list[str] = []
    # Everything allowed, so only URL validation can stop these; a bug would dial loopback at worst.
    policy = FetchPolicy(
        domains=("*",), allow_private=True, timeout=2.0, resolver=mapping_resolver({}, calls)
    )
    assert fetch_error(url, policy).error_code == "image_url_invalid"
    assert calls == []


def test_unresolvable_name() -> None:
    calls: list[str] = []
    policy = FetchPolicy(domains=("*",), resolver=mapping_resolver({}, calls))
    error = fetch_error("http://no-such-host.test/img.png", policy)
    assert error.error_code == "image_url_unreachable"
    assert calls == ["no-such-host.test"]


def test_connection_refused() -> None:
    error = fetch_error(f"http://127.0.0.1:{free_port()}/img.png", local_policy())
    assert error.error_code == "image_url_unreachable"


def test_https_to_plain_http_server_fails_cleanly(servers: Servers) -> None:
    url = f"https://127.0.0.1:{servers.port}/img.png"
    assert fetch_error(url, local_policy()).error_code == "image_url_unreachable"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_verifies_the_url_host_on_the_pinned_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    command += ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=images.test"]
    command += ["-addext", "subjectAltName=DNS:images.test"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=30,
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    stop = threading.Event()
    server = RecordingServer(("127.0.0.1", 0), stop)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        calls: list[str] = []
        resolve = mapping_resolver({"images.test": ["127.0.0.1"], "wrong.test": ["127.0.0.1"]}, calls)
        policy = local_policy(domains=("*.test",), resolver=resolve)
        # The system trust store does not know this certificate.
        assert (
            fetch_error(f"https://images.test:{port}/img.png", policy).error_code == "image_url_unreachable"
        )

        client_context = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setattr(urlfetch, "_tls_context", lambda: client_context)
        assert fetch_image(f"https://images.test:{port}/img.png", policy) == PNG
        assert server.requests[-1][1]["Host"] == f"images.test:{port}"
        # Same address, same certificate, but the URL names another host: verification must fail.
        assert fetch_error(f"https://wrong.test:{port}/img.png", policy).error_code == "image_url_unreachable"
        assert len(server.requests) == 1
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
