"""The client's address behind reverse proxies (GLMVISION_TRUSTED_PROXIES).

X-Forwarded-For is written by whoever sends the request, so it is believed only as far as the
proxies we run: a hop count (exactly N proxies always sit in front) or the proxies' networks.
Either way the address the connection came from is kept in `environ["glmvision.orig_remote_addr"]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from werkzeug.middleware.proxy_fix import ProxyFix

from glmvision.core.config import ConfigError
from glmvision.web.security.allowlist import Network, in_networks, parse_address, parse_network

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from _typeshed.wsgi import WSGIApplication as WSGIApp

VARIABLE = "GLMVISION_TRUSTED_PROXIES"
ORIGINAL = "glmvision.orig_remote_addr"

# Some proxies append the client's port: "1.2.3.4:5678" or "[2001:db8::1]:5678".
_V4_PORT = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}$")
_V6_BRACKETS = re.compile(r"^\[([^\]]+)\](?::\d{1,5})?$")


def trusted_proxy_app(wsgi_app: WSGIApp, spec: str) -> WSGIApp:
    """Wrap `wsgi_app` so REMOTE_ADDR is the client's per GLMVISION_TRUSTED_PROXIES ("" or "0": as is)."""
    spec = spec.strip()
    if spec in ("", "0"):
        return wsgi_app
    if spec.isascii() and spec.isdigit():
        return _HopCount(wsgi_app, int(spec))
    networks: list[Network] = []
    for entry in spec.split(","):
        if entry.strip():
            try:
                networks.append(parse_network(entry))
            except ValueError:
                problem = f"is not a hop count, an address or a CIDR; e.g. {VARIABLE}=1 or 10.0.0.0/8"
                raise ConfigError(f"{VARIABLE}: {entry.strip()!r} {problem}") from None
    if not networks:
        raise ConfigError(f"{VARIABLE}: {spec!r} names no address or CIDR; e.g. {VARIABLE}=10.0.0.0/8")
    return TrustedNetworks(wsgi_app, networks)


class _HopCount(ProxyFix):
    """ProxyFix for X-Forwarded-For only, recording the original address under our own key too."""

    def __init__(self, app: WSGIApp, hops: int) -> None:
        super().__init__(app, x_for=hops, x_proto=0, x_host=0, x_port=0, x_prefix=0)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[ORIGINAL] = environ.get("REMOTE_ADDR")
        return super().__call__(environ, start_response)


def _hop_address(entry: str) -> str | None:
    """The address of one X-Forwarded-For entry (port and brackets dropped), or None if malformed."""
    entry = entry.strip()
    match = _V4_PORT.match(entry) or _V6_BRACKETS.match(entry)
    address = parse_address(match.group(1) if match else entry)
    return None if address is None else str(address)


class TrustedNetworks:
    """WSGI middleware: believe X-Forwarded-For only from proxies inside `networks`."""

    def __init__(self, app: WSGIApp, networks: Iterable[Network]) -> None:
        self.app = app
        self.networks: tuple[Network, ...] = tuple(networks)

    def trusted(self, address: str | None) -> bool:
        """Whether `address` is one of our proxies."""
        parsed = parse_address(address)
        return parsed is not None and in_networks(parsed, self.networks)

    def client(self, forwarded_for: str) -> str | None:
        """The client in an X-Forwarded-For value sent by a trusted proxy, or None when it names none."""
        chosen: str | None = None
        for entry in reversed(forwarded_for.split(",")):
            hop = _hop_address(entry)
            if hop is None:
                # Whatever lies left of garbage was never vetted by our proxies: stop at the last good hop.
                break
            chosen = hop
            if not self.trusted(hop):
                break
        return chosen

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        remote = environ.get("REMOTE_ADDR")
        environ[ORIGINAL] = remote
        if self.trusted(remote):
            client = self.client(environ.get("HTTP_X_FORWARDED_FOR", ""))
            if client is not None:
                environ["REMOTE_ADDR"] = client
        return self.app(environ, start_response)
