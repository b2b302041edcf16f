"""API keys as the service handles them: found in a request's headers, kept only as digests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def key_digest(key: str) -> bytes:
    """The SHA-256 of a key: what is kept, compared and (shortened) used as its id; never the key."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """Return the key the client sent as `Authorization: Bearer` or `X-API-Key`, if any."""
    header = headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("X-API-Key", "").strip()
    return key or None
