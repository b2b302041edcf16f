"""Fetch a client's http(s) image URL without opening an SSRF hole: allowlist, address checks, pinning.

Every hop (the URL and each redirect) is checked from scratch: scheme, host against the allowed domain
patterns, every address the host resolves to, and then the TCP connection goes to exactly the address
that was checked, so a second DNS answer can never steer it elsewhere. No proxies, no connection reuse,
one overall deadline for the whole fetch.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import math
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from glmvision.core.config import Settings
from glmvision.core.errors import APIError, bad_request

log = logging.getLogger("glmvision")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Iterable[str]]

USER_AGENT = "glmvision"
MAX_URL_CHARS = 8192
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Refused even when private addresses are allowed: cloud metadata services (AWS, ECS, EKS, GCP, Azure,
# Alibaba) hand out credentials to anything that can reach them.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",
        "169.254.169.253",
        "169.254.170.2",
        "169.254.170.23",
        "168.63.129.16",
        "100.100.100.200",
        "fd00:ec2::254",
        "fd00:ec2::23",
    )
)
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_UNSAFE_CHARS = re.compile(r"[\x00-\x20\x7f]")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# A last label like this makes a host an IPv4 address to inet_aton and WHATWG (127.1, 0x7f.1, 2130706433).
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_READ_SIZE = 64 * 1024


def is_url(value: str) -> bool:
    """Return True when value has a `scheme://` prefix (so not base64, not a data: URL)."""
    return isinstance(value, str) and _SCHEME.match(value.strip()) is not None


def _plain_ip(address: str | IPAddress) -> IPAddress:
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        address = ipaddress.IPv6Address(int(address))
    return address


def _judged_addresses(address: IPAddress) -> list[IPAddress]:
    # Translation prefixes only carry an IPv4 address; tunnel prefixes are judged as well as what they carry.
    if isinstance(address, ipaddress.IPv4Address):
        return [address]
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    judged: list[IPAddress] = [address]
    if address.sixtofour is not None:
        judged.append(address.sixtofour)
    if address.teredo is not None:
        judged.extend(address.teredo)
    return judged


def _always_refused(address: IPAddress) -> bool:
    if address.is_multicast or address.is_unspecified or address in METADATA_ADDRESSES:
        return True
    return isinstance(address, ipaddress.IPv4Address) and (address in _THIS_NETWORK or address == _BROADCAST)


def is_address_allowed(address: str | IPAddress, allow_private: bool = False) -> bool:
    """Return whether an image fetch may connect to this IP address."""
    for judged in _judged_addresses(_plain_ip(address)):
        if _always_refused(judged) or not (allow_private or judged.is_global):
            return False
    return True


def normalize_host(host: str) -> str:
    """Return a host's canonical form (lower-case IDNA ASCII, no trailing dot, compressed IP) or raise."""
    if host.startswith("[") and host.endswith("]"):
        return _ipv6_literal(host[1:-1])
    if ":" in host:
        return _ipv6_literal(host)
    name = host[:-1] if host.endswith(".") else host
    if not name:
        raise ValueError("empty host")
    if name.isascii():
        name = name.lower()
    else:
        try:
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise ValueError(f"{host!r} is not a valid internationalised host name") from None
    labels = name.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        # Only canonical dotted-decimal IPv4 is accepted: other spellings mean different things to
        # different parsers, so they are refused rather than guessed.
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise ValueError(f"{host!r} is not a dotted-decimal IPv4 address") from None
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{host!r} is not a valid host name")
    return name


def _ipv6_literal(text: str) -> str:
    if "%" in text:
        raise ValueError("IPv6 zone identifiers are not allowed")
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        raise ValueError(f"{text!r} is not a valid IPv6 address") from None


def normalize_pattern(pattern: str) -> str:
    """Return a domain pattern's canonical form: `*`, `*.suffix`, a host name or an IP; raise if invalid."""
    text = pattern.strip()
    if text == "*":
        return text
    if text.startswith("*."):
        suffix = normalize_host(text[2:])
        if _is_ip(suffix):
            raise ValueError(f"domain pattern {pattern!r}: a wildcard needs a host name, not an address")
        return "*." + suffix
    if "*" in text:
        raise ValueError(f"domain pattern {pattern!r}: '*' is only allowed alone or as a leading '*.'")
    try:
        return normalize_host(text)
    except ValueError as exc:
        raise ValueError(f"domain pattern {pattern!r}: {exc}") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host_matches_normalized(host: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        # Subdomains at any depth, never the bare suffix itself.
        return host.endswith(pattern[1:])
    return host == pattern


def host_matches(host: str, pattern: str) -> bool:
    """Return whether host is covered by one domain pattern (`*.x` covers subdomains of x, not x)."""
    try:
        return _host_matches_normalized(normalize_host(host), normalize_pattern(pattern))
    except ValueError:
        return False


def system_resolver(host: str, port: int) -> list[str]:
    """Return every IP address the OS resolves host to, in its order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    families = (socket.AF_INET, socket.AF_INET6)
    return list(dict.fromkeys(str(info[4][0]) for info in infos if info[0] in families))


@dataclass(frozen=True)
class FetchPolicy:
    """What image URLs may be fetched, from where, and how much time and data a fetch may take.

    domains: host patterns, case-insensitive and IDNA-normalised: `cdn.example.com` (that host),
    `*.example.org` (any subdomain, at any depth, but not example.org itself), `*` (any host), or an IP
    address. Empty disables URL fetching. Patterns are normalised on construction; a malformed one raises
    ValueError.
    """

    domains: tuple[str, ...]
    allow_private: bool = False
    max_bytes: int = 10 * 1024 * 1024
    timeout: float = 10.0
    max_redirects: int = 3
    resolver: Resolver | None = None

    def __post_init__(self) -> None:
        if isinstance(self.domains, str):
            raise ValueError("domains must be a sequence of patterns, not one string")
        object.__setattr__(self, "domains", tuple(normalize_pattern(p) for p in self.domains))
        if self.max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if not 0 < self.timeout < math.inf:
            raise ValueError("timeout must be a positive number of seconds")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must not be negative")

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchPolicy:
        """Build the policy from the GLMVISION_IMAGE_URL_* settings."""
        return cls(
            domains=tuple(settings.image_url_domains),
            allow_private=settings.image_url_allow_private,
            max_bytes=int(settings.image_url_max_mb * 1024 * 1024),
            timeout=settings.image_url_timeout,
            max_redirects=settings.image_url_max_redirects,
        )

    def host_allowed(self, host: str) -> bool:
        """Return whether a normalised host matches one of the domain patterns."""
        return any(_host_matches_normalized(host, pattern) for pattern in self.domains)

    def address_allowed(self, address: IPAddress) -> bool:
        """Return whether a fetch may connect to this resolved address (override to test)."""
        return is_address_allowed(address, self.allow_private)


@dataclass(frozen=True)
class _Target:
    """One validated hop: where to connect and what to ask for."""

    scheme: str
    host: str
    port: int
    request_path: str

    @property
    def literal_ip(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _subject(hop: int) -> str:
    return "The image URL" if hop == 0 else "The image URL redirects to a URL that"


def _parse_url(url: str, hop: int, param: str) -> _Target:
    subject = _subject(hop)

    def invalid(reason: str) -> APIError:
        return bad_request("image_url_invalid", f"{subject} {reason}", param)

    if len(url) > MAX_URL_CHARS:
        raise invalid(f"is longer than {MAX_URL_CHARS} characters.")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid("is not valid Unicode.") from None
    # urlsplit silently drops tabs and newlines; refuse them (and spaces) instead of guessing.
    if _UNSAFE_CHARS.search(url):
        raise invalid("contains spaces or control characters.")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise invalid("could not be parsed.") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise invalid("must use http:// or https://.")
    netloc = parts.netloc
    if not netloc:
        raise invalid("has no host.")
    if "@" in netloc:
        raise invalid("must not contain a user name or password.")
    if netloc.startswith("["):
        end = netloc.find("]")
        raw_host, rest = netloc[: end + 1], netloc[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise invalid("has an invalid host.")
        raw_port = rest[1:]
    else:
        raw_host, _, raw_port = netloc.partition(":")
    if not raw_host:
        raise invalid("has no host.")
    try:
        host = normalize_host(raw_host)
    except ValueError:
        raise invalid("has an invalid host.") from None
    port = _DEFAULT_PORTS[parts.scheme]
    if raw_port:
        if not _PORT.match(raw_port) or not 0 < int(raw_port) < 65536:
            raise invalid("has an invalid port.")
        port = int(raw_port)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # Non-ASCII in a path is sent the way browsers send it: UTF-8, percent-encoded.
    path = "".join(char if char.isascii() else quote(char, safe="") for char in path)
    return _Target(parts.scheme, host, port, path)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("image fetch deadline passed")
    return left


def _resolve_before(resolver: Resolver, host: str, port: int, deadline: float) -> list[str]:
    # getaddrinfo has no timeout of its own, so it runs aside while we wait only as long as the deadline.
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = list(resolver(host, port))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="glmvision-resolve", daemon=True)
    worker.start()
    worker.join(_remaining(deadline))
    if worker.is_alive():
        raise TimeoutError("name resolution timed out")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _checked_addresses(
    policy: FetchPolicy, target: _Target, deadline: float, hop: int, param: str
) -> list[IPAddress]:
    literal = target.literal_ip
    if literal is not None:
        addresses = [literal]
    else:
        try:
            raw = _resolve_before(policy.resolver or system_resolver, target.host, target.port, deadline)
            addresses = [_plain_ip(item) for item in raw]
        except TimeoutError:
            raise
        except (OSError, UnicodeError, ValueError):
            addresses = []
        if not addresses:
            what = f"The host {target.host!r}" if hop == 0 else "The host the image URL redirects to"
            raise bad_request("image_url_unreachable", f"{what} could not be resolved.", param)
    refused = [address for address in addresses if not policy.address_allowed(address)]
    if refused:
        # Operators see the addresses; clients only learn that the host is off limits.
        log.warning("image URL refused: host %s resolves to %s", target.host, ", ".join(map(str, refused)))
        what = f"The host {target.host!r}" if hop == 0 else "The host the image URL redirects to"
        raise bad_request(
            "image_url_blocked", f"{what} resolves to an address image URLs may not use.", param
        )
    return addresses


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _connect(target: _Target, addresses: list[IPAddress], deadline: float) -> socket.socket:
    last_error: OSError = ConnectionError("no address to connect to")
    for address in addresses:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect((str(address), target.port))
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        if target.scheme == "http":
            return sock
        try:
            sock.settimeout(_remaining(deadline))
            # Certificate checked against the URL's host, while the socket stays on the checked address.
            return _tls_context().wrap_socket(sock, server_hostname=target.host)
        except BaseException:
            sock.close()
            raise
    raise last_error


class _DeadlineReader(io.RawIOBase):
    """Socket reads that each wait only until the fetch deadline, so slow drips cannot outlast it."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """The one socket method http.client.HTTPResponse calls, with every read under the deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


def _header_text(value: str) -> str:
    # http.client decodes headers as Latin-1; servers that put raw non-ASCII in Location mean UTF-8.
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


@dataclass(frozen=True)
class _Redirect:
    location: str


def _too_large(policy: FetchPolicy, param: str) -> APIError:
    size = f"{policy.max_bytes / (1024 * 1024):g} MiB"
    return APIError(413, "image_url_too_large", f"The image at the URL is larger than {size}.", param)


def _unreachable(message: str, param: str) -> APIError:
    return bad_request("image_url_unreachable", message, param)


def _exchange(
    sock: socket.socket,
    target: _Target,
    policy: FetchPolicy,
    deadline: float,
    param: str,
    media: str = "image",
) -> bytes | _Redirect:
    request = (
        f"GET {target.request_path} HTTP/1.1\r\n"
        f"Host: {target.host_header}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        f"Accept: {media}/*\r\n"
        "Accept-Encoding: identity\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    sock.settimeout(_remaining(deadline))
    sock.sendall(request.encode("ascii"))
    response = http.client.HTTPResponse(_DeadlineSocket(sock, deadline), method="GET")  # type: ignore[arg-type]
    try:
        response.begin()
        status = response.status
        if status in REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise bad_request(
                    "image_url_upstream_status",
                    f"The image URL answered HTTP {status} without a Location.",
                    param,
                )
            return _Redirect(_header_text(location))
        if not 200 <= status < 300:
            raise bad_request("image_url_upstream_status", f"The image URL answered HTTP {status}.", param)
        content_type = response.getheader("Content-Type") or ""
        mime = content_type.split(";", 1)[0].strip().lower()
        if not mime.startswith(f"{media}/") or mime == f"{media}/":
            shown = f"{mime[:100]!r}" if mime else "no Content-Type"
            what = f"The {media} URL returned {shown}, not {'an image' if media == 'image' else 'a video'}."
            raise bad_request("image_url_not_image", what, param)
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip"):
            raise _unreachable("The image URL answered with an unsupported Content-Encoding.", param)
        if response.length is not None and response.length > policy.max_bytes:
            raise _too_large(policy, param)
        body = bytearray()
        while chunk := response.read1(min(_READ_SIZE, policy.max_bytes + 1 - len(body))):
            body += chunk
            if len(body) > policy.max_bytes:
                raise _too_large(policy, param)
        if response.length:
            raise _unreachable("The image URL's connection closed before the whole image arrived.", param)
        if encoding != "identity":
            return _gunzip(bytes(body), policy, param)
        return bytes(body)
    finally:
        response.close()


def _gunzip(data: bytes, policy: FetchPolicy, param: str) -> bytes:
    decoder = zlib.decompressobj(wbits=31)
    try:
        # The cap applies to the decoded size too: a small gzip body can expand enormously.
        decoded = decoder.decompress(data, policy.max_bytes + 1)
    except zlib.error:
        raise _unreachable("The image URL sent a corrupt gzip body.", param) from None
    if len(decoded) > policy.max_bytes:
        raise _too_large(policy, param)
    if not decoder.eof or decoder.unused_data:
        raise _unreachable("The image URL sent a corrupt gzip body.", param)
    return decoded


def _network_error(exc: BaseException, policy: FetchPolicy, param: str) -> APIError:
    if isinstance(exc, TimeoutError):
        return bad_request(
            "image_url_timeout",
            f"The image URL did not deliver the image within {policy.timeout:g} s.",
            param,
        )
    if isinstance(exc, ssl.SSLError):
        return _unreachable("The TLS connection to the image URL's host failed.", param)
    if isinstance(exc, http.client.HTTPException):
        return _unreachable("The image URL's host sent a malformed HTTP response.", param)
    return _unreachable("The image URL's host could not be reached.", param)


def fetch_image(url: str, policy: FetchPolicy, param: str = "image_url", media: str = "image") -> bytes:
    """Download the image (or `media`: "video") at an http(s) URL under the policy; raise APIError with
    a stable code if not."""
    if not policy.domains:
        raise bad_request(
            "image_url_disabled", "This server does not fetch image URLs; send the image as base64.", param
        )
    deadline = time.monotonic() + policy.timeout
    current = url.strip()
    for hop in range(policy.max_redirects + 1):
        target = _parse_url(current, hop, param)
        if not policy.host_allowed(target.host):
            what = f"The host {target.host!r} is" if hop == 0 else "The image URL redirects to a host that is"
            raise bad_request(
                "image_url_domain_not_allowed", f"{what} not in the allowed image domains.", param
            )
        try:
            addresses = _checked_addresses(policy, target, deadline, hop, param)
            sock = _connect(target, addresses, deadline)
            try:
                result = _exchange(sock, target, policy, deadline, param, media)
            finally:
                sock.close()
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(exc, policy, param) from None
        if not isinstance(result, _Redirect):
            return result
        current = urljoin(current, result.location)
    raise bad_request(
        "image_url_too_many_redirects",
        f"The image URL redirects more than {policy.max_redirects} time(s).",
        param,
    )
