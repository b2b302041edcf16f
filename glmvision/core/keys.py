"""API keys as the service handles them: found in a request's headers, kept only as digests."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from glmvision.core.config import ConfigError, Settings, is_toml, read_api_keys


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


# The keys file's TOML form: `[keys.<name>]` tables with these fields.
_FIELDS = frozenset(
    {"key", "key_sha256", "requests_per_minute", "tokens_per_day", "images_per_day", "models", "admin"}
)
_LIMITS = ("requests_per_minute", "tokens_per_day", "images_per_day")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class KeySpec:
    """One accepted key: its digest, and for a named key its limits, allowed models and admin flag."""

    digest: bytes = field(repr=False)
    name: str | None = None  # None: a plain key from the list form (no limits, not an admin)
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    images_per_day: int | None = None
    models: tuple[str, ...] | None = None  # None: every model and adapter
    admin: bool = False

    @property
    def limited(self) -> bool:
        """Whether any quota applies to the key."""
        return any(getattr(self, limit) is not None for limit in _LIMITS)

    def allows(self, adapter: str | None) -> bool:
        """Whether the key may use the base model (`adapter` None) or that adapter."""
        if self.models is None:
            return True
        for entry in self.models:
            if entry == "*":
                return True
            _, colon, wanted = entry.partition(":")
            if (adapter is None and not colon) or (adapter is not None and wanted in ("*", adapter)):
                return True
        return False


def plain_key(key: str) -> KeySpec:
    """An unnamed key from GLMVISION_API_KEYS or the one-key-per-line file."""
    return KeySpec(key_digest(key))


def _fail(source: str, where: str, problem: str) -> ConfigError:
    return ConfigError(f"GLMVISION_API_KEYS_FILE: {source}: {where}: {problem}")


def _named_key(source: str, name: str, table: Any) -> KeySpec:
    where = f"[keys.{name}]"
    if not _NAME.match(name):
        raise _fail(source, where, "a name is 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(table, dict):
        raise _fail(source, where, "must be a table")
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise _fail(source, where, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})")
    if ("key" in table) == ("key_sha256" in table):
        raise _fail(source, where, "give exactly one of key and key_sha256")
    if "key" in table:
        if not isinstance(table["key"], str) or not table["key"].strip():
            raise _fail(source, where, "key must be a non-empty string")
        digest = key_digest(table["key"].strip())
    else:
        if not isinstance(table["key_sha256"], str) or not _HEX64.match(table["key_sha256"]):
            raise _fail(source, where, "key_sha256 must be 64 hex digits (sha256sum of the key)")
        digest = bytes.fromhex(table["key_sha256"])
    limits: dict[str, int] = {}
    for limit in _LIMITS:
        value = table.get(limit)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _fail(source, where, f"{limit} must be a whole number >= 0, not {value!r}")
        limits[limit] = value
    models = table.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
    ):
        raise _fail(source, where, 'models must be a list of model names (e.g. "glm-4.6v-flash:adapter")')
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise _fail(source, where, f"admin must be true or false, not {admin!r}")
    return KeySpec(digest, name, models=None if models is None else tuple(models), admin=admin, **limits)


def parse_keys_toml(text: str, source: str = "keys.toml") -> list[KeySpec]:
    """The named keys of a TOML keys file; any mistake is one ConfigError line naming the key."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"GLMVISION_API_KEYS_FILE: {source}: not valid TOML: {exc}") from None
    extra = sorted(set(document) - {"keys"})
    if extra:
        raise _fail(source, extra[0], "unknown table; keys go in [keys.<name>] tables")
    tables = document.get("keys", {})
    if not isinstance(tables, dict) or not tables:
        raise _fail(source, "keys", "no [keys.<name>] tables")
    specs = [_named_key(source, name, table) for name, table in tables.items()]
    seen: dict[bytes, str] = {}
    for spec in specs:
        if spec.digest in seen:
            raise _fail(source, f"[keys.{spec.name}]", f"the same key as [keys.{seen[spec.digest]}]")
        seen[spec.digest] = spec.name or ""
    return specs


def load_keys(settings: Settings) -> list[KeySpec]:
    """Every accepted key: GLMVISION_API_KEYS and a plain keys file unnamed, a `.toml` keys file named."""
    specs = [plain_key(key) for key in read_api_keys(settings)]
    path = settings.api_keys_file
    if is_toml(path):
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"GLMVISION_API_KEYS_FILE: cannot read {path}: {exc.strerror}") from None
        specs.extend(parse_keys_toml(text, path))
    return specs
