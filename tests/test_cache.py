"""The response cache: keys, the in-process LRU + TTL store, perceptual buckets, Redis (up, down, back)."""

from __future__ import annotations

import copy
import io
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import helpers
import numpy as np
import pytest
import redis
from helpers import redis_server, wait_for
from PIL import Image

from glmvision.core.config import ConfigError, load_settings
from glmvision.serving import cache as cache_module
from glmvision.serving.cache import BUCKET_SIZE, REDIS_PREFIX, CachedAnswer, CacheKey, ResponseCache, make_key

T = TypeVar("T")

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]},
]
GENERATION: dict[str, Any] = {"max_new_tokens": 64, "do_sample": False, "temperature": 0.0, "seed": None}
ANSWER = CachedAnswer(
    "A striped pattern.", None, prompt_tokens=120, completion_tokens=5, finish_reason="stop"
)
OTHER = CachedAnswer(
    "Something else.", "thought", prompt_tokens=99, completion_tokens=3, finish_reason="length"
)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build_cache(timer: Callable[[], float] | None = None, **settings: Any) -> ResponseCache:
    """A ResponseCache from GLMVISION_<NAME> settings given as keyword arguments."""
    loaded = load_settings({f"GLMVISION_{name.upper()}": value for name, value in settings.items()})
    cache = (
        ResponseCache.from_settings(loaded)
        if timer is None
        else ResponseCache.from_settings(loaded, timer=timer)
    )
    assert cache is not None
    return cache


def picture(seed: int = 0, width: int = 96, height: int = 72) -> Image.Image:
    """A smooth, seeded RGB picture (smooth, so lossy codecs keep it perceptually the same)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(float)
    scale = 96 / width  # the same few waves across the picture whatever its size
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.03, 0.15) * scale, rng.uniform(0.03, 0.15) * scale, rng.uniform(0, 6.3)
        channels.append(128 + 100 * np.sin(x * fx + phase) * np.cos(y * fy + phase / 2))
    return Image.fromarray(np.stack(channels, -1).clip(0, 255).astype(np.uint8), "RGB")


def reencode(image: Image.Image, fmt: str, **options: Any) -> Image.Image:
    """Encode and decode again, as a client sending the same picture in another format would."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def with_pixels_changed(image: Image.Image, count: int = 3) -> Image.Image:
    changed = image.copy()
    for i in range(count):
        changed.putpixel((10 + i, 5), (0, 0, 0))
    return changed


def key_of(
    images: list[Image.Image],
    conversation: Any = None,
    settings: dict[str, Any] | None = None,
    model_id: str = "glm-4.6v-flash",
    revision: str = "abc123",
    perceptual: bool = False,
) -> CacheKey:
    return make_key(
        model_id,
        revision,
        images,
        CONVERSATION if conversation is None else conversation,
        GENERATION if settings is None else settings,
        perceptual,
    )


def bits(a: CacheKey, b: CacheKey) -> int:
    """The largest per-image pHash distance between two keys."""
    return max((x ^ y).bit_count() for x, y in zip(a.phashes, b.phashes, strict=True))


def within(call: Callable[[], T], timeout: float = 30.0) -> T:
    """Run `call` in a thread; fail the test if it has not returned after `timeout` seconds."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the call did not return within {timeout} s"
    if errors:
        raise errors[0]
    return result[0]


# --- values and keys ---


def test_answer_round_trips_through_bytes() -> None:
    for answer in (ANSWER, OTHER, CachedAnswer('漢字 and "quotes"\n', "", 0, 0, "stop")):
        assert CachedAnswer.from_bytes(answer.to_bytes()) == answer


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"v": 1}',
        b'{"v": 2, "text": "a", "reasoning": null, "prompt_tokens": 1, "completion_tokens": 1, '
        b'"finish_reason": "stop"}',
        b'{"v": 1, "text": 5, "reasoning": null, "prompt_tokens": 1, "completion_tokens": 1, '
        b'"finish_reason": "stop"}',
        b'{"v": 1, "text": "a", "reasoning": 3, "prompt_tokens": 1, "completion_tokens": 1, '
        b'"finish_reason": "stop"}',
        b'{"v": 1, "text": "a", "reasoning": null, "prompt_tokens": true, "completion_tokens": 1, '
        b'"finish_reason": "stop"}',
        b'{"v": 1, "text": "a", "reasoning": null, "prompt_tokens": 1, "completion_tokens": -1, '
        b'"finish_reason": "stop"}',
        ANSWER.to_bytes()[:-3],
    ],
)
def test_garbage_bytes_are_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        CachedAnswer.from_bytes(raw)


def _swap_order(images: list[Image.Image]) -> list[Image.Image]:
    return images[::-1]


def _one_pixel(images: list[Image.Image]) -> list[Image.Image]:
    changed = images[0].copy()
    r, g, b = changed.getpixel((0, 0))
    changed.putpixel((0, 0), (r ^ 1, g, b))
    return [changed, images[1]]


def _same_bytes_other_size(images: list[Image.Image]) -> list[Image.Image]:
    first = images[0]
    return [Image.frombytes("RGB", (first.height, first.width), first.tobytes()), images[1]]


def _grey(images: list[Image.Image]) -> list[Image.Image]:
    return [images[0].convert("L").convert("RGB"), images[1]]


def _text(conversation: list[dict[str, Any]]) -> None:
    conversation[1]["content"][1]["text"] = "What is in this picture!"


def _role(conversation: list[dict[str, Any]]) -> None:
    conversation[0]["role"] = "user"


def _image_position(conversation: list[dict[str, Any]]) -> None:
    conversation[1]["content"].reverse()


@pytest.mark.parametrize("change", [_swap_order, _one_pixel, _same_bytes_other_size, _grey])
def test_any_image_change_changes_the_exact_key(
    change: Callable[[list[Image.Image]], list[Image.Image]],
) -> None:
    images = [picture(0), picture(1)]
    base = key_of(images)
    changed = key_of(change(images))
    assert changed.exact != base.exact
    assert changed.rest == base.rest  # the pixels are not part of the perceptual bucket


@pytest.mark.parametrize("change", [_text, _role, _image_position])
def test_any_conversation_change_changes_both_digests(change: Callable[[list[dict[str, Any]]], None]) -> None:
    images = [picture(0)]
    conversation = copy.deepcopy(CONVERSATION)
    change(conversation)
    base, changed = key_of(images), key_of(images, conversation=conversation)
    assert changed.exact != base.exact
    assert changed.rest != base.rest


@pytest.mark.parametrize(
    "overrides",
    [
        {"settings": {**GENERATION, "max_new_tokens": 65}},
        {"settings": {**GENERATION, "seed": 7}},
        {"settings": {**GENERATION, "top_p": 0.9}},
        {"model_id": "glm-4.6v"},
        {"revision": "abc124"},
    ],
)
def test_any_setting_model_or_revision_change_changes_the_key(overrides: dict[str, Any]) -> None:
    images = [picture(0)]
    base, changed = key_of(images), key_of(images, **overrides)
    assert changed.exact != base.exact
    assert changed.rest != base.rest


def test_lossless_reencodes_and_reordered_dicts_give_the_same_key() -> None:
    original = picture(0)
    png, bmp, webp = (
        reencode(original, "PNG"),
        reencode(original, "BMP"),
        reencode(original, "WEBP", lossless=True),
    )
    base = key_of([original])
    for image in (png, bmp, webp):
        assert key_of([image]) == base
    reordered_settings = dict(reversed(list(GENERATION.items())))
    reordered_conversation = [dict(reversed(list(message.items()))) for message in CONVERSATION]
    assert list(reordered_settings) != list(GENERATION)
    assert key_of([original], conversation=reordered_conversation, settings=reordered_settings) == base
    # A lossy re-encode is different pixels, so a different exact key.
    assert key_of([reencode(original, "JPEG", quality=90)]).exact != base.exact


def test_parts_are_domain_separated() -> None:
    images = [picture(0)]
    assert (
        key_of(images, model_id="ab", revision="c").exact != key_of(images, model_id="a", revision="bc").exact
    )
    swapped = key_of(images, conversation={"a": 1}, settings={})
    assert swapped.exact != key_of(images, conversation={}, settings={"a": 1}).exact
    # The same conversation with and without an image: the image count is part of the bucket.
    assert key_of([]).rest != key_of(images).rest


def test_phashes_only_when_perceptual() -> None:
    images = [picture(0), picture(1)]
    plain, perceptual = key_of(images), key_of(images, perceptual=True)
    assert plain.phashes == ()
    assert len(perceptual.phashes) == 2
    assert all(0 <= h < 2**64 for h in perceptual.phashes)
    assert perceptual.phashes[0] != perceptual.phashes[1]
    assert (plain.exact, plain.rest) == (perceptual.exact, perceptual.rest)


def test_key_of_something_not_json_able_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        key_of([picture(0)], settings={"stop": {1, 2}})


# --- the in-process store ---


def test_settings_choose_the_store() -> None:
    assert ResponseCache.from_settings(load_settings({"GLMVISION_CACHE": "false"})) is None
    memory = build_cache()
    assert memory.shared is False
    assert memory.perceptual is False
    assert build_cache(cache_phash_distance=0).perceptual is True
    shared = build_cache(cache_uri="redis://127.0.0.1:6399/2")  # never connects until used
    assert shared.shared is True
    shared.close()


@pytest.mark.parametrize(
    "uri", ["ftp://x", "memcached://127.0.0.1:11211", "127.0.0.1:6379", "redis://h:port/0"]
)
def test_unusable_uri_is_a_config_error(uri: str) -> None:
    with pytest.raises(ConfigError, match="GLMVISION_CACHE_URI"):
        ResponseCache.from_settings(load_settings({"GLMVISION_CACHE_URI": uri}))


def test_memory_round_trip() -> None:
    cache = build_cache()
    key, other = key_of([picture(0)]), key_of([picture(1)])
    assert cache.get(key) is None
    cache.put(key, ANSWER)
    assert cache.get(key) == ANSWER
    assert cache.get(other) is None
    cache.put(key, OTHER)  # a later answer replaces the earlier one
    assert cache.get(key) == OTHER
    assert cache.errors == 0


def test_least_recently_used_is_evicted_beyond_cache_size() -> None:
    cache = build_cache(cache_size=2)
    first, second, third = (key_of([picture(seed)]) for seed in range(3))
    cache.put(first, ANSWER)
    cache.put(second, OTHER)
    assert cache.get(first) == ANSWER  # first is now the most recently used
    cache.put(third, ANSWER)
    assert cache.get(second) is None
    assert cache.get(first) == ANSWER
    assert cache.get(third) == ANSWER


def test_memory_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    cache = build_cache(timer=clock, cache_ttl=60)
    key = key_of([picture(0)])
    cache.put(key, ANSWER)
    clock.now += 59
    assert cache.get(key) == ANSWER
    clock.now += 2
    assert cache.get(key) is None


def test_memory_is_safe_under_threads() -> None:
    cache = build_cache(cache_size=10_000)
    keys = [key_of([], conversation=[{"role": "user", "text": str(i)}]) for i in range(800)]
    failures: list[str] = []

    def work(part: list[CacheKey]) -> None:
        for key in part:
            answer = CachedAnswer(key.exact, None, 1, 1, "stop")
            cache.put(key, answer)
            if cache.get(key) != answer:
                failures.append(key.exact)

    threads = [threading.Thread(target=work, args=(keys[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert all(cache.get(key) == CachedAnswer(key.exact, None, 1, 1, "stop") for key in keys)


# --- perceptual matching ---


def test_a_slightly_changed_image_hits_only_when_perceptual() -> None:
    original = picture(0)
    stored = key_of([original], perceptual=True)
    close = [with_pixels_changed(original), reencode(original, "JPEG", quality=85)]
    far = picture(5)
    perceptual, exact_only = build_cache(cache_phash_distance=8), build_cache()
    perceptual.put(stored, ANSWER)
    exact_only.put(key_of([original]), ANSWER)
    for image in close:
        query = key_of([image], perceptual=True)
        assert query.exact != stored.exact
        assert bits(query, stored) <= 8
        assert perceptual.get(query) == ANSWER
        assert exact_only.get(key_of([image])) is None
    far_query = key_of([far], perceptual=True)
    assert bits(far_query, stored) > 8
    assert perceptual.get(far_query) is None
    # Same image, other question: a different bucket.
    other_question = key_of([with_pixels_changed(original)], conversation=[{"role": "user"}], perceptual=True)
    assert perceptual.get(other_question) is None


def test_large_images_match_perceptually_too() -> None:
    # Large enough that the pHash works on a reduced copy.
    original = picture(0, 1024, 768)
    cache = build_cache(cache_phash_distance=8)
    cache.put(key_of([original], perceptual=True), ANSWER)
    assert cache.get(key_of([reencode(original, "JPEG", quality=85)], perceptual=True)) == ANSWER
    assert cache.get(key_of([with_pixels_changed(original, 50)], perceptual=True)) == ANSWER
    assert cache.get(key_of([picture(5, 1024, 768)], perceptual=True)) is None
    assert cache.get(key_of([picture(0, 512, 384)])) is None  # exact only: other pixels


def test_the_distance_limit_is_inclusive_and_exact() -> None:
    original = picture(0)
    stored, query = (
        key_of([original], perceptual=True),
        key_of([reencode(original, "JPEG", quality=50)], perceptual=True),
    )
    distance = bits(stored, query)
    assert distance >= 1
    at_limit, below = (
        build_cache(cache_phash_distance=distance),
        build_cache(cache_phash_distance=distance - 1),
    )
    for cache in (at_limit, below):
        cache.put(stored, ANSWER)
    assert at_limit.get(query) == ANSWER
    assert below.get(query) is None


def test_every_image_must_be_close_and_counts_must_match() -> None:
    a, b = picture(0), picture(1)
    cache = build_cache(cache_phash_distance=8)
    cache.put(key_of([a, b], perceptual=True), ANSWER)
    assert cache.get(key_of([with_pixels_changed(a), with_pixels_changed(b)], perceptual=True)) == ANSWER
    assert cache.get(key_of([with_pixels_changed(a), picture(5)], perceptual=True)) is None


def test_the_nearest_entry_wins() -> None:
    original = picture(0)
    near, farther = with_pixels_changed(original), reencode(original, "JPEG", quality=50)
    query = key_of([original], perceptual=True)
    near_key, farther_key = key_of([near], perceptual=True), key_of([farther], perceptual=True)
    assert bits(query, near_key) < bits(query, farther_key) <= 8
    cache = build_cache(cache_phash_distance=8)
    cache.put(near_key, ANSWER)
    cache.put(farther_key, OTHER)  # more recent, but farther
    assert cache.get(query) == ANSWER


def test_a_bucket_keeps_only_the_most_recent_entries() -> None:
    original = picture(0)
    target, query = (
        key_of([original], perceptual=True),
        key_of([with_pixels_changed(original)], perceptual=True),
    )
    fillers = [key_of([picture(seed)], perceptual=True) for seed in range(1, BUCKET_SIZE + 1)]
    assert all(bits(query, filler) > 8 for filler in fillers)
    cache = build_cache(cache_phash_distance=8)
    cache.put(target, ANSWER)
    for filler in fillers[:-1]:
        cache.put(filler, OTHER)
    assert cache.get(query) == ANSWER  # the target is the last of BUCKET_SIZE entries
    cache.put(fillers[-1], OTHER)
    assert cache.get(query) is None
    assert cache.get(target) == ANSWER  # pushed out of the bucket, still there by its exact key


def test_perceptual_entries_expire_with_the_ttl() -> None:
    clock = FakeClock()
    cache = build_cache(timer=clock, cache_ttl=60, cache_phash_distance=8)
    original = picture(0)
    cache.put(key_of([original], perceptual=True), ANSWER)
    query = key_of([with_pixels_changed(original)], perceptual=True)
    assert cache.get(query) == ANSWER
    clock.now += 61
    assert cache.get(query) is None


# --- Redis ---


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    with redis_server(tmp_path) as port:
        yield port


def redis_client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def test_redis_entries_are_shared_by_instances_and_expire(redis_port: int) -> None:
    uri = f"redis://127.0.0.1:{redis_port}/0"
    writer, reader = build_cache(cache_uri=uri, cache_ttl=120), build_cache(cache_uri=uri, cache_ttl=120)
    key = key_of([picture(0)])
    assert reader.get(key) is None
    writer.put(key, ANSWER)
    assert reader.get(key) == ANSWER  # another worker (or replica) finds it
    assert reader.get(key_of([picture(1)])) is None
    client = redis_client(redis_port)
    assert 0 < client.ttl(REDIS_PREFIX + key.exact) <= 120
    assert client.keys(REDIS_PREFIX + "bucket:*") == []  # no buckets without perceptual matching
    assert writer.errors == reader.errors == 0
    client.close()
    writer.close()
    reader.close()


def test_redis_ttl_is_rounded_up_to_a_whole_second(redis_port: int) -> None:
    cache = build_cache(cache_uri=f"redis://127.0.0.1:{redis_port}/0", cache_ttl=0.3)
    key = key_of([picture(0)])
    cache.put(key, ANSWER)
    client = redis_client(redis_port)
    assert 0 < client.pttl(REDIS_PREFIX + key.exact) <= 1000
    client.close()
    cache.close()


def test_redis_uses_the_database_in_the_uri(redis_port: int) -> None:
    cache = build_cache(cache_uri=f"redis://127.0.0.1:{redis_port}/3")
    key = key_of([picture(0)])
    cache.put(key, ANSWER)
    db0, db3 = (
        redis_client(redis_port),
        redis.Redis(host="127.0.0.1", port=redis_port, db=3, socket_timeout=5),
    )
    assert db3.exists(REDIS_PREFIX + key.exact) == 1
    assert db0.exists(REDIS_PREFIX + key.exact) == 0
    db0.close()
    db3.close()
    cache.close()


def test_redis_perceptual_hits_bucket_bound_and_expiry(redis_port: int) -> None:
    uri = f"redis://127.0.0.1:{redis_port}/0"
    writer = build_cache(cache_uri=uri, cache_ttl=120, cache_phash_distance=8)
    reader = build_cache(cache_uri=uri, cache_ttl=120, cache_phash_distance=8)
    original = picture(0)
    stored = key_of([original], perceptual=True)
    query = key_of([reencode(original, "JPEG", quality=85)], perceptual=True)
    writer.put(stored, ANSWER)
    assert reader.get(query) == ANSWER
    assert reader.get(key_of([picture(5)], perceptual=True)) is None
    client = redis_client(redis_port)
    bucket = REDIS_PREFIX + "bucket:" + stored.rest
    assert 0 < client.ttl(bucket) <= 120
    writer.put(stored, ANSWER)  # the same entry again is not a second bucket slot
    assert client.llen(bucket) == 1
    for seed in range(1, BUCKET_SIZE + 6):
        writer.put(key_of([picture(seed)], perceptual=True), OTHER)
    assert client.llen(bucket) == BUCKET_SIZE
    assert reader.get(query) is None  # the stored entry left the bucket
    assert reader.get(stored) == ANSWER
    # An entry still in the bucket whose value expired is skipped.
    latest = key_of([picture(BUCKET_SIZE + 5)], perceptual=True)
    near_latest = key_of([with_pixels_changed(picture(BUCKET_SIZE + 5))], perceptual=True)
    assert reader.get(near_latest) == OTHER
    client.pexpire(REDIS_PREFIX + latest.exact, 1)
    assert wait_for(lambda: client.exists(REDIS_PREFIX + latest.exact) == 0, timeout=10)
    assert reader.get(near_latest) is None
    assert writer.errors == reader.errors == 0
    client.close()
    writer.close()
    reader.close()


def test_a_corrupted_redis_value_is_a_miss_not_an_error(redis_port: int) -> None:
    cache = build_cache(cache_uri=f"redis://127.0.0.1:{redis_port}/0", cache_phash_distance=8)
    key = key_of([picture(0)], perceptual=True)
    cache.put(key, ANSWER)
    client = redis_client(redis_port)
    client.set(REDIS_PREFIX + key.exact, b"\x00garbage")
    assert cache.get(key) is None
    assert cache.get(key_of([with_pixels_changed(picture(0))], perceptual=True)) is None
    client.lpush(REDIS_PREFIX + "bucket:" + key.rest, b"not an entry", b"\xff")
    assert cache.get(key_of([with_pixels_changed(picture(0))], perceptual=True)) is None
    assert cache.errors == 0
    client.close()
    cache.close()


def test_redis_down_is_a_miss_then_the_cache_recovers_on_the_same_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "BACKOFF_SECONDS", 0.2)
    key = key_of([picture(0)], perceptual=True)
    with redis_server(tmp_path) as port:
        cache = build_cache(cache_uri=f"redis://127.0.0.1:{port}/0", cache_phash_distance=8)
        cache.put(key, ANSWER)
        assert cache.get(key) == ANSWER
    # The server is gone (terminated when the block ended).
    assert within(lambda: cache.get(key)) is None
    assert cache.errors == 1
    within(lambda: cache.put(key, ANSWER))  # dropped, not raised
    # After each back-off the cache tries Redis again, and counts the failure again.
    assert wait_for(lambda: within(lambda: cache.get(key)) is None and cache.errors >= 3, timeout=20)
    monkeypatch.setattr(helpers, "free_port", lambda: port)
    with redis_server(tmp_path) as same_port:
        assert same_port == port

        def works() -> bool:
            cache.put(key, OTHER)
            return cache.get(key) == OTHER

        assert wait_for(works, timeout=20)
        errors = cache.errors
        assert cache.get(key_of([with_pixels_changed(picture(0))], perceptual=True)) == OTHER
        assert cache.errors == errors
    cache.close()


def test_after_an_error_redis_is_skipped_for_the_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "BACKOFF_SECONDS", 3600.0)
    key = key_of([picture(0)])
    with redis_server(tmp_path) as port:
        cache = build_cache(cache_uri=f"redis://127.0.0.1:{port}/0")
        cache.put(key, ANSWER)
    assert within(lambda: cache.get(key)) is None
    assert cache.errors == 1
    for _ in range(5):
        within(lambda: cache.put(key, ANSWER))
        assert within(lambda: cache.get(key)) is None
    assert cache.errors == 1  # skipped, not tried again
    cache.close()


def test_a_redis_that_never_answers_costs_one_read_timeout() -> None:
    # Accepts connections (the kernel's backlog) but never reads or answers: the read timeout ends the call.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cache = build_cache(cache_uri=f"redis://127.0.0.1:{port}/0")
        key = key_of([picture(0)])
        assert within(lambda: cache.get(key)) is None
        assert cache.errors == 1
        cache.close()
