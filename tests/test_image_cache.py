"""The worker's cache of the image processor's output (glmvision.backends.local.imagecache)."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from glmvision.backends.local.imagecache import (
    ImageCache,
    cache_budget_bytes,
    digest_rows,
    image_digest,
    options_digest,
    row_digests,
)
from glmvision.backends.local.loading import load_processor
from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.config import load_settings
from glmvision.core.images import open_image


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str, **save: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def _decoded(raw: bytes) -> Image.Image:
    return open_image(raw, max_side=4096, max_pixels=16_000_000).image


def _loaded(demo_model_dir: Path, cache_mb: float) -> LoadedModel:
    settings = load_settings(
        {"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_ENCODER_CACHE_MB": str(cache_mb)}
    )
    return load_processor(settings, device="cpu")


def _user(*parts: Any) -> dict[str, Any]:
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p}
        for p in parts
    ]
    return {"role": "user", "content": content}


def _assert_same(cached: Any, plain: Any) -> None:
    assert set(cached.keys()) == set(plain.keys())
    for key in plain:
        assert cached[key].dtype == plain[key].dtype, key
        assert torch.equal(cached[key], plain[key]), key


# The cache alone.


def _entry(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((rows, 4), dtype=torch.float32), torch.tensor([[1, 1, rows]])


def test_cache_counts_hits_misses_and_bytes() -> None:
    cache = ImageCache(10_000)
    assert cache.get(b"a" * 16) is None
    pixels, grid = _entry(10)
    cache.put(b"a" * 16, pixels, grid)
    found = cache.get(b"a" * 16)
    assert found is not None and found[0] is pixels and found[1] is grid
    assert cache.bytes == 10 * 4 * 4 + 3 * 8
    assert cache.stats() == {
        "entries": 1,
        "bytes": 184,
        "budget_bytes": 10_000,
        "hits": 1,
        "misses": 1,
        "evictions": 0,
    }
    cache.put(b"a" * 16, *_entry(10))  # the same key again replaces, not doubles
    assert cache.bytes == 184 and len(cache) == 1


def test_cache_evicts_least_recently_used_by_bytes() -> None:
    one = 10 * 4 * 4 + 3 * 8
    cache = ImageCache(3 * one)
    for key in (b"a", b"b", b"c"):
        cache.put(key, *_entry(10))
    assert cache.get(b"a") is not None  # a is now the most recent: b goes first
    cache.put(b"d", *_entry(10))
    assert cache.get(b"b") is None
    assert all(cache.get(key) is not None for key in (b"a", b"c", b"d"))
    assert cache.evictions == 1 and cache.bytes == 3 * one
    cache.put(b"big", *_entry(100))  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.get(b"big") is None and cache.evictions == 1 and len(cache) == 3


def test_cache_is_consistent_under_threads() -> None:
    one = 10 * 4 * 4 + 3 * 8
    cache = ImageCache(5 * one)

    def work(seed: int) -> None:
        for i in range(300):
            key = bytes([(seed * 7 + i) % 13])
            if cache.get(key) is None:
                cache.put(key, *_entry(10))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.hits + cache.misses == 8 * 300
    assert len(cache) <= 5 and cache.bytes == len(cache) * one


def test_budget_per_device() -> None:
    assert cache_budget_bytes(-1, "cpu") == 256 * 2**20
    assert cache_budget_bytes(-1, "cuda:1") == 1024 * 2**20
    assert cache_budget_bytes(0, "cuda") == 0
    assert cache_budget_bytes(1.5, "cpu") == int(1.5 * 2**20)
    assert not ImageCache(cache_budget_bytes(0, "cpu")).enabled


# Keys.


def test_key_is_the_pixels_not_the_encoding() -> None:
    picture = _noise(96, 64, seed=1)
    options = b"o" * 16
    png = image_digest(_decoded(_encoded(picture, "PNG")), options)
    assert image_digest(_decoded(_encoded(picture, "WEBP", lossless=True)), options) == png
    assert image_digest(_decoded(_encoded(picture, "BMP")), options) == png
    # A JPEG's decoded pixels, sent again losslessly, are the same image.
    jpeg = _decoded(_encoded(picture, "JPEG", quality=90))
    assert image_digest(_decoded(_encoded(jpeg, "PNG")), options) == image_digest(jpeg, options)
    assert image_digest(jpeg, options) != png
    other = picture.copy()
    other.putpixel((5, 5), (0, 0, 0) if other.getpixel((5, 5)) != (0, 0, 0) else (1, 1, 1))
    assert image_digest(other, options) != png
    assert image_digest(picture, b"p" * 16) != image_digest(picture, options)
    assert image_digest(picture.convert("L"), options) != image_digest(picture, options)
    assert image_digest(np.asarray(picture), options) == image_digest(np.asarray(picture.copy()), options)


def test_options_that_change_the_output_change_the_key(demo_model_dir: Path) -> None:
    processor = _loaded(demo_model_dir, 0).processor.image_processor
    base = options_digest(processor, {"return_tensors": "pt"})
    assert options_digest(processor, {"return_tensors": "pt"}) == base
    assert options_digest(processor, {"return_tensors": "pt", "merge_size": 1}) != base
    for name, value in (
        ("size", {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}),
        ("patch_size", 7),
        ("temporal_patch_size", 1),
        ("image_mean", (0.5, 0.5, 0.5)),
        ("image_std", (0.5, 0.5, 0.5)),
    ):
        changed = processor.__class__(**{**processor.to_dict(), name: value})
        assert options_digest(changed, {"return_tensors": "pt"}) != base, name


def test_digest_rows_round_trip() -> None:
    digests = [bytes(range(16)), bytes(range(255, 239, -1))]
    rows = digest_rows(digests)
    assert rows.dtype == torch.int64 and tuple(rows.shape) == (2, 2)
    assert int(rows[0, 0]) == int.from_bytes(bytes(range(8)), "little", signed=True)
    assert row_digests(rows) == digests


# In prepare(): the same inputs with and without the cache.


def test_prepare_is_identical_with_and_without_the_cache(demo_model_dir: Path) -> None:
    cached, plain = _loaded(demo_model_dir, 64), _loaded(demo_model_dir, 0)
    a, b, c = _noise(200, 150, 1), _noise(200, 150, 2), _noise(120, 260, 3)
    conversations = [
        [_user(a, "one image")],
        [_user(a, b, c, "three, two the same shape")],
        [_user(b, a, "the first two again, other order")],
        [_user(a, "repeated", a)],
        [_user(c, "new with cached"), {"role": "assistant", "content": "ok"}, _user(a, c, "and again")],
        [_user("text only")],
    ]
    for _ in range(2):  # the second round is answered from the cache
        for messages in conversations:
            got = cached.prepare(messages, enable_thinking=False)
            _assert_same(got, plain.prepare(messages, enable_thinking=False))
    stats = cached.image_cache_stats()
    assert stats["entries"] == 3 and stats["misses"] == 3 and stats["hits"] > 3
    assert plain.image_cache_stats()["entries"] == 0


def test_image_hashes_in_prompt_order(demo_model_dir: Path) -> None:
    loaded = _loaded(demo_model_dir, 0)  # present with the cache off too
    a, b = _noise(200, 150, 1), _noise(90, 90, 2)
    options = options_digest(loaded.processor.image_processor, {"return_tensors": "pt"})
    inputs = loaded.prepare([_user(b, "x", a, b)], enable_thinking=False)
    hashes = inputs["image_hashes"]
    assert hashes.dtype == torch.int64 and tuple(hashes.shape) == (3, 2)
    assert row_digests(hashes) == [image_digest(image, options) for image in (b, a, b)]
    assert "image_hashes" not in loaded.prepare([_user("no image")], enable_thinking=False)
    again = _loaded(demo_model_dir, 64).prepare([_user(b, "x", a, b)], enable_thinking=False)
    assert torch.equal(again["image_hashes"], hashes)


def test_cache_smaller_than_an_image_still_answers(demo_model_dir: Path) -> None:
    tiny, plain = _loaded(demo_model_dir, 0.001), _loaded(demo_model_dir, 0)
    messages = [_user(_noise(200, 150, 1), _noise(150, 200, 2), "too big to keep")]
    for _ in range(2):
        _assert_same(
            tiny.prepare(messages, enable_thinking=False), plain.prepare(messages, enable_thinking=False)
        )
    assert tiny.image_cache_stats()["entries"] == 0 and tiny.image_cache_stats()["misses"] == 4


def test_cache_evicts_in_prepare(demo_model_dir: Path) -> None:
    loaded, plain = _loaded(demo_model_dir, 64), _loaded(demo_model_dir, 0)
    one = _noise(200, 150, 1)
    loaded.prepare([_user(one, "measure")], enable_thinking=False)
    size = loaded.image_cache.bytes
    loaded.image_cache.budget_bytes = 2 * size  # room for two such images
    images = [_noise(200, 150, seed) for seed in range(2, 6)]
    for image in images:
        messages = [_user(image, "next")]
        _assert_same(
            loaded.prepare(messages, enable_thinking=False), plain.prepare(messages, enable_thinking=False)
        )
    stats = loaded.image_cache_stats()
    assert stats["evictions"] == 3 and stats["entries"] == 2 and stats["bytes"] <= 2 * size


def test_threads_prepare_at_once(demo_model_dir: Path) -> None:
    cached, plain = _loaded(demo_model_dir, 64), _loaded(demo_model_dir, 0)
    images = [_noise(200, 150, seed) for seed in range(3)]
    requests = [[_user(images[i % 3], images[(i + 1) % 3], f"request {i}")] for i in range(12)]
    expected = [plain.prepare(messages, enable_thinking=False) for messages in requests]
    results: list[Any] = [None] * len(requests)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = cached.prepare(requests[i], enable_thinking=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got, want in zip(results, expected, strict=True):
        _assert_same(got, want)
    assert cached.image_cache_stats()["entries"] == 3


def test_refused_image_is_still_the_clients_error(demo_model_dir: Path) -> None:
    from glmvision.core.errors import APIError

    loaded = _loaded(demo_model_dir, 64)
    with pytest.raises(APIError) as caught:
        loaded.prepare([_user(Image.new("RGB", (4000, 10)), "too thin")], enable_thinking=False)
    assert caught.value.error_code == "image_rejected"


def test_image_hashes_cross_the_engine_wire(demo_model_dir: Path) -> None:
    from glmvision.backends.engine.shm import open_tensors, share_tensors

    inputs = _loaded(demo_model_dir, 64).prepare([_user(_noise(90, 90, 1), "x")], enable_thinking=False)
    shared, refs = share_tensors(dict(inputs))
    with shared:
        received = open_tensors(refs)
    assert set(received) == set(inputs)
    for key in inputs:
        assert torch.equal(received[key], inputs[key]), key


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_engine_answers_prepared_inputs_with_hashes(make_app: Any, scheduler: str) -> None:
    from helpers import vision_body

    from glmvision.web.state import app_state

    app = make_app(scheduler=scheduler, encoder_cache_mb="8")
    with app.test_client() as client:
        for _ in range(2):  # the second time from the worker's image cache
            response = client.post("/v1/chat/vision", json=vision_body())
            assert response.status_code == 200, response.get_json()
    stats = app_state(app).service.backend.holder.get(timeout=60).image_cache_stats()
    assert stats["hits"] >= 1 and stats["entries"] >= 1
