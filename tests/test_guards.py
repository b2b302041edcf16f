"""Guards: the client address behind proxies, the IP allowlist and the per-client circuit breaker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from helpers import redis_server, wait_for

from glmvision.core.config import ConfigError, load_settings
from glmvision.ops import breaker as breaker_module
from glmvision.ops.breaker import KEY_PREFIX, CircuitBreaker, client_hash
from glmvision.web.security.allowlist import IpAllowlist
from glmvision.web.security.proxy import ORIGINAL, trusted_proxy_app


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# The client address behind proxies.


def echo_app(spec: str) -> Flask:
    """A tiny app answering with the address it sees, behind trusted_proxy_app(spec)."""
    app = Flask("echo")

    @app.get("/")
    def echo() -> ResponseReturnValue:
        return jsonify(
            addr=request.remote_addr,
            orig=request.environ.get(ORIGINAL),
            scheme=request.scheme,
            host=request.host,
        )

    app.wsgi_app = trusted_proxy_app(app.wsgi_app, spec)  # type: ignore[method-assign]
    return app


def seen(app: Flask, remote: str, forwarded_for: str | None = None, **headers: str) -> dict[str, str]:
    """What the app sees for a connection from `remote` carrying X-Forwarded-For `forwarded_for`."""
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    response = app.test_client().get("/", headers=headers, environ_base={"REMOTE_ADDR": remote})
    assert response.status_code == 200
    return response.get_json()


@pytest.mark.parametrize("spec", ["", "0", "  "])
def test_no_trusted_proxies_ignores_forwarded_for(spec: str) -> None:
    """By default X-Forwarded-For is never believed, and the app is not even wrapped."""
    wsgi = Flask("plain").wsgi_app
    assert trusted_proxy_app(wsgi, spec) is wsgi
    assert seen(echo_app(spec), "10.0.0.1", "1.2.3.4")["addr"] == "10.0.0.1"


def test_hop_count_one_takes_the_rightmost_entry() -> None:
    """One proxy: the entry it appended is the client; whatever the client wrote before is ignored."""
    view = seen(echo_app("1"), "10.0.0.1", "6.6.6.6, 203.0.113.9")
    assert view["addr"] == "203.0.113.9"
    assert view["orig"] == "10.0.0.1"


def test_hop_count_two_takes_the_second_from_the_right() -> None:
    """Two proxies: the second entry from the right is the client."""
    app = echo_app("2")
    assert seen(app, "10.0.0.1", "6.6.6.6, 203.0.113.9, 10.0.0.2")["addr"] == "203.0.113.9"
    # Fewer entries than hops: nothing is believed.
    assert seen(app, "10.0.0.1", "203.0.113.9")["addr"] == "10.0.0.1"


def test_hop_count_trusts_only_forwarded_for() -> None:
    """X-Forwarded-Proto and X-Forwarded-Host are not ours to believe: scheme and host stay."""
    view = seen(
        echo_app("1"), "10.0.0.1", "203.0.113.9", **{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil"}
    )
    assert (view["addr"], view["scheme"], view["host"]) == ("203.0.113.9", "http", "localhost")


def test_cidr_trusts_a_proxy_inside_the_network() -> None:
    """A connection from inside a trusted CIDR may name the client."""
    view = seen(echo_app("10.0.0.0/8"), "10.1.2.3", "203.0.113.9")
    assert (view["addr"], view["orig"]) == ("203.0.113.9", "10.1.2.3")


def test_cidr_a_direct_client_cannot_spoof_its_address() -> None:
    """A client outside the trusted networks that sends X-Forwarded-For itself keeps its own address."""
    view = seen(echo_app("10.0.0.0/8"), "198.51.100.7", "10.0.0.9, 1.2.3.4")
    assert (view["addr"], view["orig"]) == ("198.51.100.7", "198.51.100.7")


def test_cidr_a_spoofed_chain_through_one_proxy_yields_the_real_client() -> None:
    """`XFF: 1.2.3.4` written by the client, then the proxy's own entry: the proxy's entry wins."""
    assert seen(echo_app("10.0.0.0/8"), "10.0.0.5", "1.2.3.4, 203.0.113.9")["addr"] == "203.0.113.9"


def test_cidr_walks_past_every_trusted_proxy() -> None:
    """Several proxies of ours in a row are skipped; the first untrusted one from the right is the client."""
    app = echo_app("10.0.0.0/8, 192.168.0.0/16")
    assert seen(app, "10.0.0.5", "1.2.3.4, 203.0.113.9, 192.168.1.1, 10.0.0.7")["addr"] == "203.0.113.9"


def test_cidr_all_trusted_takes_the_leftmost() -> None:
    """A request from inside (every hop trusted) is from its leftmost address."""
    assert seen(echo_app("10.0.0.0/8"), "10.0.0.5", "10.0.0.8, 10.0.0.7")["addr"] == "10.0.0.8"


def test_cidr_a_malformed_entry_stops_the_walk() -> None:
    """Left of garbage nothing is believed: the last good hop is taken, or the proxy itself if none."""
    app = echo_app("10.0.0.0/8")
    assert seen(app, "10.0.0.5", "203.0.113.9, not-an-ip, 10.0.0.7")["addr"] == "10.0.0.7"
    assert seen(app, "10.0.0.5", "203.0.113.9, unknown")["addr"] == "10.0.0.5"
    assert seen(app, "10.0.0.5", "")["addr"] == "10.0.0.5"


def test_cidr_without_forwarded_for_keeps_the_proxy_address() -> None:
    """No header: the proxy's address stays."""
    assert seen(echo_app("10.0.0.0/8"), "10.0.0.5")["addr"] == "10.0.0.5"


def test_cidr_ipv6_proxies_and_clients() -> None:
    """IPv6 networks, IPv6 entries (ports and brackets dropped), and an IPv4-mapped proxy address."""
    app = echo_app("fd00::/8, 10.0.0.0/8")
    assert seen(app, "fd00::1", "2001:db8::5")["addr"] == "2001:db8::5"
    assert seen(app, "fd00::1", "[2001:db8::5]:443")["addr"] == "2001:db8::5"
    assert seen(app, "fd00::1", "203.0.113.9:5555, fd12::3")["addr"] == "203.0.113.9"
    assert seen(app, "::ffff:10.0.0.5", "2001:db8::6")["addr"] == "2001:db8::6"
    assert seen(app, "2001:db8::1", "2001:db8::5")["addr"] == "2001:db8::1"


def test_a_single_address_trusts_exactly_that_proxy() -> None:
    """A bare address is a /32: its neighbour is not trusted."""
    app = echo_app("10.0.0.5")
    assert seen(app, "10.0.0.5", "203.0.113.9")["addr"] == "203.0.113.9"
    assert seen(app, "10.0.0.6", "203.0.113.9")["addr"] == "10.0.0.6"


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("abc", "'abc'"),
        ("-1", "'-1'"),
        ("1.5", "'1.5'"),
        ("10.0.0.300", "'10.0.0.300'"),
        ("10.0.0.0/8,x", "'x'"),
    ],
)
def test_bad_trusted_proxies_are_config_errors(spec: str, named: str) -> None:
    """Garbage is refused at start-up, naming the variable and the bad entry."""
    with pytest.raises(ConfigError) as caught:
        trusted_proxy_app(Flask("x").wsgi_app, spec)
    assert str(caught.value).startswith("GLMVISION_TRUSTED_PROXIES: ")
    assert named in str(caught.value)


def test_only_commas_is_a_config_error() -> None:
    """A list with no entries is a mistake, not "trust nobody"."""
    with pytest.raises(ConfigError, match="GLMVISION_TRUSTED_PROXIES"):
        trusted_proxy_app(Flask("x").wsgi_app, ", ,")


# The IP allowlist.


def test_empty_allowlist_allows_everyone() -> None:
    """No networks: disabled, and every address (even none) is allowed."""
    allowlist = IpAllowlist()
    assert not allowlist.enabled
    assert all(allowlist.allows(address) for address in ("1.2.3.4", "2001:db8::1", None, "garbage"))


def test_ipv4_cidrs_and_single_addresses() -> None:
    """A CIDR covers its range; a bare address is a /32."""
    allowlist = IpAllowlist.from_settings(load_settings({"GLMVISION_ALLOWED_IPS": "10.0.0.0/8, 192.0.2.7"}))
    assert allowlist.enabled
    assert allowlist.allows("10.255.0.1")
    assert not allowlist.allows("11.0.0.1")
    assert allowlist.allows("192.0.2.7")
    assert not allowlist.allows("192.0.2.8")


def test_ipv6_cidrs_and_single_addresses() -> None:
    """IPv6 ranges, and a bare IPv6 address is a /128."""
    allowlist = IpAllowlist.from_settings(load_settings({"GLMVISION_ALLOWED_IPS": "2001:db8::/32,::1"}))
    assert allowlist.allows("2001:db8:1234::9")
    assert not allowlist.allows("2001:db9::1")
    assert allowlist.allows("::1")
    assert not allowlist.allows("::2")


def test_families_do_not_cross() -> None:
    """All of IPv4 does not admit an IPv6 client."""
    allowlist = IpAllowlist.from_settings(load_settings({"GLMVISION_ALLOWED_IPS": "0.0.0.0/0"}))
    assert allowlist.allows("203.0.113.9")
    assert not allowlist.allows("2001:db8::1")


def test_host_bits_in_a_cidr_are_accepted() -> None:
    """`10.0.0.1/8` means 10.0.0.0/8."""
    allowlist = IpAllowlist.from_settings(
        load_settings({"GLMVISION_ALLOWED_IPS": "10.0.0.1/8,2001:db8::1/32"})
    )
    assert allowlist.allows("10.9.9.9")
    assert allowlist.allows("2001:db8:ffff::1")
    assert not allowlist.allows("11.0.0.1")


def test_ipv4_mapped_addresses_are_judged_as_ipv4() -> None:
    """`::ffff:10.1.2.3` is 10.1.2.3, whichever family the entry is written in."""
    allowlist = IpAllowlist.from_settings(load_settings({"GLMVISION_ALLOWED_IPS": "10.0.0.0/8"}))
    assert allowlist.allows("::ffff:10.1.2.3")
    assert not allowlist.allows("::ffff:11.1.2.3")
    mapped_entry = IpAllowlist.from_settings(load_settings({"GLMVISION_ALLOWED_IPS": "::ffff:10.0.0.0/104"}))
    assert mapped_entry.allows("10.1.1.1")
    assert not mapped_entry.allows("11.1.1.1")


def test_scoped_addresses_are_judged_by_their_address() -> None:
    """`fe80::1%eth0` is fe80::1."""
    link_local = IpAllowlist.from_settings(load_settings({"GLMVISION_ALLOWED_IPS": "fe80::/10"}))
    assert link_local.allows("fe80::1%eth0")
    other = IpAllowlist.from_settings(load_settings({"GLMVISION_ALLOWED_IPS": "2001:db8::/32"}))
    assert not other.allows("fe80::1%eth0")


@pytest.mark.parametrize("address", [None, "", "garbage", "10.0.0.300", "10.0.0.1:80"])
def test_missing_or_unparsable_addresses_are_refused_when_enabled(address: str | None) -> None:
    """Not knowing who it is means not letting it in."""
    allowlist = IpAllowlist.from_settings(load_settings({"GLMVISION_ALLOWED_IPS": "0.0.0.0/0,::/0"}))
    assert not allowlist.allows(address)


@pytest.mark.parametrize("entry", ["10.0.0.300", "10.0.0.0/33", "example.com", "2001:db8::/129"])
def test_bad_allowlist_entries_are_config_errors(entry: str) -> None:
    """One clear line naming the variable and the entry."""
    with pytest.raises(ConfigError) as caught:
        IpAllowlist.from_settings(load_settings({"GLMVISION_ALLOWED_IPS": f"10.0.0.0/8,{entry}"}))
    assert str(caught.value) == (
        f"GLMVISION_ALLOWED_IPS: {entry!r} is not an address or CIDR; "
        "e.g. GLMVISION_ALLOWED_IPS=10.0.0.0/8,127.0.0.1"
    )


# The circuit breaker, in memory.


def test_opens_exactly_at_n_timeouts_in_a_row() -> None:
    """N-1 timeouts leave it closed; the Nth opens it for the whole cool-down."""
    breaker = CircuitBreaker(3, 60.0, clock=FakeClock())
    assert not breaker.shared
    assert [breaker.record("c", timed_out=True) for _ in range(2)] == [False, False]
    assert breaker.retry_after("c") is None
    assert breaker.record("c", timed_out=True)
    assert breaker.retry_after("c") == 60


def test_a_success_resets_the_count() -> None:
    """Timeouts must be in a row: a success in between starts the count again."""
    breaker = CircuitBreaker(3, 60.0, clock=FakeClock())
    for timed_out in (True, True, False, True, True):
        assert not breaker.record("c", timed_out)
    assert breaker.retry_after("c") is None
    assert breaker.record("c", timed_out=True)


def test_retry_after_counts_down_and_the_circuit_closes_with_a_fresh_count() -> None:
    """Whole seconds, rounded up, to the end of the cool-down; then closed and counting from zero."""
    clock = FakeClock()
    breaker = CircuitBreaker(2, 10.0, clock=clock)
    breaker.record("c", True)
    assert breaker.record("c", True)
    clock.advance(3.5)
    assert breaker.retry_after("c") == 7
    clock.advance(6.4)
    assert breaker.retry_after("c") == 1
    clock.advance(0.1)
    assert breaker.retry_after("c") is None
    assert not breaker.record("c", True)
    assert breaker.retry_after("c") is None
    assert breaker.record("c", True)


def test_timeouts_while_open_do_not_extend_the_cool_down() -> None:
    """A request admitted before the opening that times out later neither reopens nor prolongs it."""
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock=clock)
    assert breaker.record("c", True)
    clock.advance(4)
    assert not breaker.record("c", True)
    assert breaker.retry_after("c") == 6


def test_a_short_cool_down_still_says_at_least_one_second() -> None:
    """Retry-After is never 0 while the circuit is open."""
    breaker = CircuitBreaker(1, 0.2, clock=FakeClock())
    assert breaker.record("c", True)
    assert breaker.retry_after("c") == 1


def test_clients_are_independent() -> None:
    """One client's timeouts do not count against another."""
    breaker = CircuitBreaker(2, 60.0, clock=FakeClock())
    breaker.record("a", True)
    assert not breaker.record("b", True)
    assert breaker.record("a", True)
    assert breaker.retry_after("a") == 60
    assert breaker.retry_after("b") is None
    assert breaker.record("b", True)


def test_a_streak_is_forgotten_after_the_window() -> None:
    """Timeouts an hour apart are not "in a row"."""
    clock = FakeClock()
    breaker = CircuitBreaker(2, 60.0, clock=clock, window=100.0)
    breaker.record("c", True)
    clock.advance(101)
    assert not breaker.record("c", True)
    assert breaker.record("c", True)


def test_memory_store_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cycling client ids cannot grow the store past its bound."""
    monkeypatch.setattr(breaker_module, "MAX_CLIENTS", 50)
    breaker = CircuitBreaker(2, 60.0, clock=FakeClock())
    for index in range(500):
        breaker.record(f"pending-{index}", True)
        breaker.record(f"opened-{index}", True)
        breaker.record(f"opened-{index}", True)
    store = breaker._store
    assert isinstance(store, breaker_module._MemoryStore)
    assert len(store.counts) <= 50
    assert len(store.opened) == 50
    assert "pending-499" in store.counts
    assert breaker.retry_after("opened-499") == 60
    assert breaker.record("pending-499", True)


def test_memory_store_is_thread_safe() -> None:
    """Many threads recording timeouts for one client open its circuit exactly once."""
    breaker = CircuitBreaker(40, 60.0, clock=FakeClock())
    barrier = threading.Barrier(8)
    opened: list[bool] = []

    def worker() -> None:
        barrier.wait()
        results = [breaker.record("c", True) for _ in range(5)]
        opened.extend(results)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert opened.count(True) == 1


def test_from_settings() -> None:
    """0 turns the breaker off; otherwise the settings build it."""
    assert CircuitBreaker.from_settings(load_settings({"GLMVISION_BREAKER_TIMEOUTS": "0"})) is None
    breaker = CircuitBreaker.from_settings(
        load_settings({"GLMVISION_BREAKER_TIMEOUTS": "2", "GLMVISION_BREAKER_COOLDOWN": "30"})
    )
    assert breaker is not None
    assert (breaker.threshold, breaker.cooldown, breaker.shared) == (2, 30.0, False)


@pytest.mark.parametrize(
    "uri",
    [
        "foo://x",
        "memcached://127.0.0.1:11211",
        "memory://x",
        "redis://127.0.0.1:abc/0",
        "redis://127.0.0.1/x",
        "",
    ],
)
def test_bad_storage_uri_is_a_config_error(uri: str) -> None:
    """Unknown schemes and unparsable Redis URIs are refused, naming the variable."""
    with pytest.raises(ConfigError, match=r"^GLMVISION_BREAKER_STORAGE_URI: "):
        CircuitBreaker.from_settings(load_settings({"GLMVISION_BREAKER_STORAGE_URI": uri}))


def test_bad_storage_uri_error_hides_the_password() -> None:
    """The error names the URI but not the Redis password in it."""
    with pytest.raises(ConfigError) as caught:
        CircuitBreaker(1, 1.0, "redis://:s3cret@127.0.0.1:abc/0")
    assert "s3cret" not in str(caught.value)
    assert "GLMVISION_BREAKER_STORAGE_URI" in str(caught.value)


# The circuit breaker on a real Redis.


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One throwaway redis-server for this module's tests."""
    with redis_server(tmp_path_factory.mktemp("redis")) as port:
        yield port


@pytest.fixture
def redis_client(redis_port: int) -> Iterator[redis.Redis]:
    """A client on the test Redis, emptied before each test."""
    client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=2)
    client.flushdb()
    yield client
    client.close()


def uri(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def test_two_workers_share_counts(redis_port: int, redis_client: redis.Redis) -> None:
    """Timeouts recorded alternately by two workers open the circuit at N, and both see it open."""
    first = CircuitBreaker(4, 120.0, uri(redis_port))
    second = CircuitBreaker(4, 120.0, uri(redis_port))
    assert first.shared and second.shared
    opened = [breaker.record("client", True) for breaker in (first, second, first, second)]
    assert opened == [False, False, False, True]
    for breaker in (first, second):
        left = breaker.retry_after("client")
        assert left is not None and 110 <= left <= 120
    assert first.retry_after("someone else") is None
    assert first.errors == second.errors == 0


def test_a_success_on_one_worker_resets_the_count_on_all(redis_port: int, redis_client: redis.Redis) -> None:
    """The count is shared, so is its reset."""
    first = CircuitBreaker(3, 120.0, uri(redis_port))
    second = CircuitBreaker(3, 120.0, uri(redis_port))
    first.record("client", True)
    second.record("client", True)
    first.record("client", False)
    assert not second.record("client", True)
    assert not first.record("client", True)
    assert second.retry_after("client") is None
    assert first.record("client", True)


def test_open_key_ttl_matches_the_cool_down(redis_port: int, redis_client: redis.Redis) -> None:
    """The open state is one key under glmvision:breaker: expiring after the cool-down; ids are hashed."""
    client_id = "k" * 5000
    breaker = CircuitBreaker(1, 90.0, uri(redis_port))
    assert breaker.record(client_id, True)
    keys = [key.decode() for key in redis_client.keys("*")]
    assert len(keys) == 1
    (key,) = keys
    assert key.startswith(KEY_PREFIX) and key.endswith(":open")
    assert client_hash(client_id) in key and len(key) < 100
    ttl_ms = int(redis_client.pttl(key))
    assert 85_000 <= ttl_ms <= 90_000


def test_the_counter_expires(redis_port: int, redis_client: redis.Redis) -> None:
    """A pending count carries an expiry, so abandoned streaks do not stay in Redis forever."""
    breaker = CircuitBreaker(5, 30.0, uri(redis_port), window=600.0)
    breaker.record("client", True)
    (key,) = [key.decode() for key in redis_client.keys("*")]
    assert key.endswith(":count")
    assert int(redis_client.get(key) or 0) == 1
    assert 590_000 <= int(redis_client.pttl(key)) <= 600_000


def test_concurrent_workers_open_the_circuit_exactly_once(redis_port: int, redis_client: redis.Redis) -> None:
    """Timeouts racing in from several workers neither lose the opening nor report it twice."""
    breakers = [CircuitBreaker(12, 120.0, uri(redis_port)) for _ in range(4)]
    barrier = threading.Barrier(12)
    opened: list[bool] = []

    def worker(breaker: CircuitBreaker) -> None:
        barrier.wait()
        opened.append(breaker.record("client", True))

    threads = [threading.Thread(target=worker, args=(breakers[index % 4],)) for index in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert opened.count(True) == 1
    assert all(breaker.retry_after("client") is not None for breaker in breakers)


def test_redis_circuit_closes_after_the_cool_down(redis_port: int, redis_client: redis.Redis) -> None:
    """When the open key expires the circuit is closed and the count starts from zero."""
    breaker = CircuitBreaker(2, 0.3, uri(redis_port))
    breaker.record("client", True)
    assert breaker.record("client", True)
    assert wait_for(lambda: breaker.retry_after("client") is None, timeout=10)
    assert not breaker.record("client", True)
    assert breaker.record("client", True)


def test_redis_down_fails_open_with_a_back_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With Redis gone, nobody is refused, nothing raises, errors count, and Redis is spared for a while."""
    clock = FakeClock()
    client_id = "secret-client-id-0123456789"
    with redis_server(tmp_path) as port:
        breaker = CircuitBreaker(1, 120.0, uri(port), clock=clock, backoff=5.0)
        assert breaker.record(client_id, True)
        assert breaker.retry_after(client_id) is not None
    caplog.set_level(logging.WARNING, logger="glmvision")
    assert breaker.retry_after(client_id) is None
    assert breaker.errors == 1
    assert not breaker.record(client_id, True)
    assert breaker.retry_after(client_id) is None
    assert breaker.errors == 1  # in the back-off: Redis was not tried again
    clock.advance(5.1)
    assert not breaker.record(client_id, True)
    assert breaker.errors == 2
    assert "circuit breaker storage error" in caplog.text
    assert client_id not in caplog.text
    assert client_hash(client_id)[:8] in caplog.text


def test_redis_timeouts_while_open_do_not_reopen(redis_port: int, redis_client: redis.Redis) -> None:
    """A late timeout on another worker while the circuit is open is not a second opening."""
    first = CircuitBreaker(1, 120.0, uri(redis_port))
    second = CircuitBreaker(1, 120.0, uri(redis_port))
    assert first.record("client", True)
    redis_client.pexpire(next(iter(redis_client.keys("*open"))), 50_000)
    assert not second.record("client", True)
    left = second.retry_after("client")
    assert left is not None and left <= 50
