"""One way to Redis: the cache, the breaker and the rate limiter share the URL handling, the timeouts and
the fail-open policy of glmvision.ops.redisstore."""

from __future__ import annotations

import logging

import pytest
import redis

from glmvision.core.config import ConfigError, load_settings
from glmvision.ops import redisstore
from glmvision.ops.breaker import CircuitBreaker
from glmvision.serving.cache import ResponseCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_gets_the_short_timeouts_and_no_retries() -> None:
    client = redisstore.client("redis://127.0.0.1:6399/3", "GLMVISION_CACHE_URI")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == redisstore.READ_TIMEOUT
    assert kwargs["socket_connect_timeout"] == redisstore.CONNECT_TIMEOUT
    assert kwargs["db"] == 3
    assert kwargs["retry"].get_retries() == 0
    client.close()


@pytest.mark.parametrize(
    "uri", ["redis://:s3cret@127.0.0.1:abc/0", "redis://127.0.0.1/x?password=s3cret", "ftp://:s3cret@h/"]
)
def test_an_unusable_url_names_the_variable_never_the_password(uri: str) -> None:
    with pytest.raises(ConfigError, match=r"^GLMVISION_X: ") as caught:
        redisstore.client(uri, "GLMVISION_X")
    assert "s3cret" not in str(caught.value)


def test_cache_and_breaker_refuse_the_same_urls() -> None:
    """A database that is not a number was quietly db 0 for the cache; now both callers refuse it."""
    for uri in ("redis://127.0.0.1/x", "redis://127.0.0.1:abc/0"):
        with pytest.raises(ConfigError, match="GLMVISION_CACHE_URI"):
            ResponseCache.from_settings(load_settings({"GLMVISION_CACHE_URI": uri}))
        with pytest.raises(ConfigError, match="GLMVISION_BREAKER_STORAGE_URI"):
            CircuitBreaker(1, 1.0, uri)
    for uri in ("redis://127.0.0.1:6399/1", "unix:///tmp/no-such-redis.sock"):
        cache = ResponseCache.from_settings(load_settings({"GLMVISION_CACHE_URI": uri}))
        assert cache is not None and cache.shared
        cache.close()
        assert CircuitBreaker(1, 1.0, uri).shared


def test_the_limiter_gets_the_same_timeouts_for_every_redis_storage() -> None:
    expected = {
        "socket_timeout": redisstore.READ_TIMEOUT,
        "socket_connect_timeout": redisstore.CONNECT_TIMEOUT,
    }
    for uri in ("redis://h:6379", "rediss://h:6379", "redis+sentinel://h:26379/m", "redis+unix:///r.sock"):
        assert redisstore.limiter_options(uri) == expected
    assert redisstore.limiter_options("memory://") == {}
    assert redisstore.limiter_options("memcached://h:11211") == {}


def test_fail_open_falls_back_logs_once_per_back_off_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    policy = redisstore.FailOpen("test storage", backoff=5.0, clock=clock)
    calls: list[int] = []

    def down() -> str:
        calls.append(1)
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")

    caplog.set_level(logging.WARNING, logger="glmvision")
    assert policy.call(down, "fallback", "for client hash abcd") == "fallback"
    assert policy.call(down, "fallback") == "fallback"
    assert (policy.errors, len(calls), len(caplog.records)) == (1, 1, 1)  # skipped in the back-off
    assert (
        "test storage error (ConnectionError: Error 111" in caplog.text
        and "for client hash abcd" in caplog.text
    )
    clock.now += 5.1
    assert policy.call(lambda: "answer", "fallback") == "answer"
    assert policy.errors == 1


def test_fail_open_leaves_other_errors_alone_unless_told() -> None:
    with pytest.raises(KeyError):
        redisstore.FailOpen("strict").call(lambda: {}["missing"], None)
    broad = redisstore.FailOpen("broad", errors=(Exception,))
    assert broad.call(lambda: {}["missing"], "fallback") == "fallback"
    assert broad.errors == 1
