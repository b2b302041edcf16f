"""Rate-limit buckets: hashed API keys (never the key itself) or else the client's address."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from glmvision.web.security.limits import rate_limit_key
from glmvision.web.state import app_state

RAW_KEY = "raw-secret-key-Zq7"  # "-" and capitals: no sha256 hex digest can contain it
OTHER_KEY = "another-secret-key-Wx3"


def _bucket(app: Flask, **environ: Any) -> str:
    headers = environ.pop("headers", {})
    with app.test_request_context("/v1/models", headers=headers, environ_base=environ):
        return rate_limit_key()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(api_keys=f"{RAW_KEY},{OTHER_KEY}", rate_limit="2/minute")


def test_a_key_bucket_is_a_hash_of_the_key(app: Flask) -> None:
    bearer = _bucket(app, headers={"Authorization": f"Bearer {RAW_KEY}"})
    header = _bucket(app, headers={"X-API-Key": RAW_KEY})
    other = _bucket(app, headers={"X-API-Key": OTHER_KEY})
    assert bearer == header  # the same key, however it is presented, is one bucket
    assert bearer != other
    assert RAW_KEY not in bearer and OTHER_KEY not in other
    digest = hashlib.sha256(RAW_KEY.encode()).hexdigest()
    assert bearer.startswith("key:") and bearer[len("key:") :] in digest


def test_without_a_key_the_bucket_is_the_address(app: Flask) -> None:
    assert _bucket(app, REMOTE_ADDR="10.1.2.3") == "ip:10.1.2.3"
    assert _bucket(app, REMOTE_ADDR="10.1.2.4") == "ip:10.1.2.4"
    # A key wins over the address: two keys from one address are two buckets.
    one = _bucket(app, REMOTE_ADDR="10.1.2.3", headers={"X-API-Key": RAW_KEY})
    two = _bucket(app, REMOTE_ADDR="10.1.2.3", headers={"X-API-Key": OTHER_KEY})
    assert one.startswith("key:") and two.startswith("key:") and one != two


def _storage_text(storage: Any) -> str:
    """Everything a limits MemoryStorage keeps, keys and values, as one string."""
    parts = []
    for name in ("storage", "expirations", "events", "locks"):
        table = getattr(storage, name, None) or {}
        parts.extend(f"{key!r}={value!r}" for key, value in dict(table).items())
    return "\n".join(parts)


def test_the_raw_key_never_reaches_the_storage(app: Flask) -> None:
    client = app.test_client()
    for _ in range(2):
        assert client.get("/v1/models", headers={"X-API-Key": RAW_KEY}).status_code == 200
    refused = client.get("/v1/models", headers={"Authorization": f"Bearer {RAW_KEY}"})
    assert refused.status_code == 429
    assert RAW_KEY not in refused.get_data(as_text=True)
    assert all(RAW_KEY not in value for value in refused.headers.values())

    storage = app_state(app).limiter.storage
    stored = _storage_text(storage)
    bucket = _bucket(app, headers={"X-API-Key": RAW_KEY})
    assert bucket in stored  # the counters were looked at, not an empty table
    assert RAW_KEY not in stored
    assert RAW_KEY not in repr(vars(storage))
