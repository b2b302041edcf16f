"""IP allowlist: which client networks may use the service (GLMVISION_ALLOWED_IPS)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flask import Flask, request

from glmvision.core.config import ConfigError
from glmvision.core.errors import APIError
from glmvision.web.route_table import UNLISTED_ENDPOINTS

if TYPE_CHECKING:
    from glmvision.core.config import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_address(text: str | None) -> Address | None:
    """An address from text (IPv4-mapped IPv6 as its IPv4, scope dropped), or None when it is not one."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text: str) -> Network:
    """A network from a CIDR (host bits allowed) or one address (/32, /128); ValueError if neither."""
    address, slash, prefix = text.strip().partition("/")
    network = ipaddress.ip_network(address.split("%", 1)[0] + slash + prefix, strict=False)
    # Addresses are judged as IPv4 when IPv4-mapped, so a mapped network must be too, or it never matches.
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    return network


def parse_networks(entries: Iterable[str], variable: str) -> tuple[Network, ...]:
    """Networks from entries (blank ones skipped); ConfigError naming `variable` for a bad one."""
    networks: list[Network] = []
    for entry in entries:
        if not entry.strip():
            continue
        try:
            networks.append(parse_network(entry))
        except ValueError:
            example = f"; e.g. {variable}=10.0.0.0/8,127.0.0.1"
            raise ConfigError(f"{variable}: {entry.strip()!r} is not an address or CIDR{example}") from None
    return tuple(networks)


def in_networks(address: Address, networks: Iterable[Network]) -> bool:
    """Whether `address` lies in one of `networks` (of its own family)."""
    return any(address.version == network.version and address in network for network in networks)


class IpAllowlist:
    """Client networks allowed in."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        """An allowlist of `networks`; none allows every client."""
        self.networks: tuple[Network, ...] = tuple(networks)

    @classmethod
    def from_settings(cls, settings: Settings) -> IpAllowlist:
        """The allowlist of GLMVISION_ALLOWED_IPS; ConfigError for an entry that is not an address or CIDR."""
        return cls(parse_networks(settings.allowed_ips, "GLMVISION_ALLOWED_IPS"))

    @property
    def enabled(self) -> bool:
        """Whether any network is listed (otherwise everyone is allowed)."""
        return bool(self.networks)

    def allows(self, address: str | None) -> bool:
        """Whether a client at `address` may come in; a missing or unparsable address may not when enabled."""
        if not self.networks:
            return True
        parsed = parse_address(address)
        return parsed is not None and in_networks(parsed, self.networks)

    def init_app(self, app: Flask) -> None:
        """Refuse clients outside the list with 403 `ip_not_allowed` on every route but /healthz."""
        if self.enabled:
            app.before_request(self._check)

    def _check(self) -> None:
        if request.endpoint not in UNLISTED_ENDPOINTS and not self.allows(request.remote_addr):
            raise APIError(403, "ip_not_allowed", "This address may not use the service.")
