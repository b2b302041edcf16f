"""The encoder cache and prefix KV reuse, on the real tiny model: follow-up turns reuse what earlier
ones computed, and greedy tokens are the same as without the caches, alone and in batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_continuous import ADMISSION, alone, run_cycles, run_schedule, tokens

from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.encodercache import EncoderCache, encoder_cache_bytes, image_hashes
from glmvision.backends.local.engine import Job
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.prefixcache import PrefixCache, image_key, prompt_keys
from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.config import load_settings
from glmvision.core.generation import GenerationParams

GREEDY = GenerationParams(max_new_tokens=6, min_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


def engine(model: LoadedModel, caches: bool = True, **overrides: Any) -> ContinuousEngine:
    values = {f"GLMVISION_{k.upper()}": v for k, v in overrides.items()}
    if not caches:
        values |= {"GLMVISION_PREFIX_CACHE": "0", "GLMVISION_ENCODER_CACHE_MB": "0"}
    return ContinuousEngine(model, load_settings(values))


def picture(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def chat(model: LoadedModel, turns: list[str], answers: list[str], images: list[Image.Image]) -> Any:
    """A conversation's inputs: the images in the first user turn, earlier answers as assistant turns."""
    messages: list[dict[str, Any]] = []
    for index, question in enumerate(turns):
        content: list[dict[str, Any]] = (
            [{"type": "image", "image": image} for image in images] if index == 0 else []
        )
        content.append({"type": "text", "text": question})
        messages.append({"role": "user", "content": content})
        if index < len(answers):
            messages.append({"role": "assistant", "content": answers[index]})
    return model.prepare(messages, enable_thinking=False)


def submit(running: ContinuousEngine, inputs: Any, params: GenerationParams = GREEDY) -> Job:
    return running._job(inputs, params, ADMISSION.admit())


QUESTIONS = ["what is in this picture", "and the colours", "any text in it", "describe the shapes"]
ANSWERS = ["a cat on a mat", "red and blue", "no text at all"]


def test_follow_up_turns_reuse_the_prefix_and_give_the_same_tokens(model: LoadedModel) -> None:
    """A 4-turn chat about two images: from turn 2 on, the prompt's start (images included) comes from
    the prefix cache, and each turn's greedy tokens equal generate() alone without any cache."""
    images = [picture(1), picture(2, (60, 140))]
    running = engine(model)
    for turn in range(1, len(QUESTIONS) + 1):
        inputs = chat(model, QUESTIONS[:turn], ANSWERS[: turn - 1], images)
        one = submit(running, inputs)
        run_schedule(running, {0: [one]})
        assert tokens(one.stream) == alone(model, (inputs, GREEDY))
        cached = one.stream.cached_tokens
        if turn == 1:
            assert cached == 0
        else:  # the whole previous prompt, images included, at least
            previous = chat(model, QUESTIONS[: turn - 1], ANSWERS[: turn - 2], images)
            assert cached >= int(previous["input_ids"].shape[1]) - 4, (turn, cached)
            assert cached < int(inputs["input_ids"].shape[1])
    stats = running.prefix_cache.stats  # type: ignore[union-attr]
    assert stats.hits == 3 and stats.misses == 1


def test_rows_reusing_prefixes_share_batches_with_fresh_rows_and_stay_exact(model: LoadedModel) -> None:
    """Follow-ups (reusing) and new conversations (not) join one batch at several steps: every row's
    tokens equal its tokens alone; the same schedule with the caches off agrees."""
    images = [[picture(seed)] for seed in (3, 4, 5)]
    first = [chat(model, QUESTIONS[:1], [], pics) for pics in images]
    follow = [chat(model, QUESTIONS[:2], ANSWERS[:1], pics) for pics in images]
    fresh = [chat(model, [QUESTIONS[3]], [], [picture(seed)]) for seed in (6, 7)]
    results = {}
    for caches in (True, False):
        running = engine(model, caches=caches, max_batch_size=16)
        run_schedule(running, {0: [submit(running, inputs) for inputs in first]})
        later = [submit(running, inputs) for inputs in [*follow, *fresh]]
        run_schedule(running, {0: later[:2], 2: later[2:4], 3: later[4:]})
        results[caches] = [tokens(one.stream) for one in later]
        reused = [one.stream.cached_tokens for one in later]
        if caches:
            assert all(n > 0 for n in reused[:3]) and reused[3:] == [0, 0], reused
        else:
            assert reused == [0] * 5
    assert results[True] == results[False]
    assert results[True] == [alone(model, (inputs, GREEDY)) for inputs in [*follow, *fresh]]


def test_different_images_behind_the_same_placeholders_never_match(model: LoadedModel) -> None:
    """Two images of one size give identical placeholder tokens: the second prompt reuses only what
    comes before its image."""
    running = engine(model)
    one = submit(running, chat(model, ["what is it"], [], [picture(10)]))
    run_schedule(running, {0: [one]})
    other_inputs = chat(model, ["what is it"], [], [picture(11)])
    assert torch.equal(other_inputs["input_ids"], one.inputs["input_ids"])  # same tokens, other pixels
    other = submit(running, other_inputs)
    run_schedule(running, {0: [other]})
    image_id = model.model.config.image_token_id
    before_image = other_inputs["input_ids"][0].tolist().index(image_id)
    assert other.stream.cached_tokens <= before_image
    assert tokens(other.stream) == alone(model, (other_inputs, GREEDY))


def test_the_same_image_in_a_new_conversation_skips_the_vision_tower(model: LoadedModel) -> None:
    """The encoder cache: a new question about the same picture (other text first, so no shared
    prefix reaches the image) encodes no image; its tokens stay exact."""
    running = engine(model, prefix_cache=False)
    image = picture(20)
    first = submit(running, chat(model, ["what is it"], [], [image]))
    run_schedule(running, {0: [first]})
    cache = running.encoder_cache
    assert cache is not None and cache.stats.misses == 1 and cache.bytes > 0
    again = chat(model, ["tell me about the picture please"], [], [image])
    second = submit(running, again)
    run_schedule(running, {0: [second]})
    assert cache.stats.hits == 1 and cache.stats.misses == 1
    assert tokens(second.stream) == alone(model, (again, GREEDY))


def test_a_long_prompt_prefilled_in_chunks_starts_after_its_cached_prefix(model: LoadedModel) -> None:
    """A follow-up longer than one cycle's prefill budget: its chunks start where the prefix ends."""
    images = [picture(30), picture(31)]
    running = engine(model, max_prefill_tokens=24)
    first_inputs = chat(model, QUESTIONS[:1], [], images)
    first = submit(running, first_inputs)
    run_cycles(running, {0: [first]})
    inputs = chat(model, QUESTIONS[:3], ANSWERS[:2], images)
    assert int(inputs["input_ids"].shape[1]) > 24
    second = submit(running, inputs)
    run_cycles(running, {0: [second]})
    assert second.stream.cached_tokens >= int(first_inputs["input_ids"].shape[1]) - 4
    assert tokens(second.stream) == alone(model, (inputs, GREEDY))


def test_cached_prefixes_give_their_room_up_before_a_newcomer_waits(model: LoadedModel) -> None:
    """The KV budget counts cached tokens: a request that needs the room evicts them, and runs."""
    inputs = [chat(model, [QUESTIONS[0]], [], [picture(seed)]) for seed in (40, 41)]
    longest = max(int(i["input_ids"].shape[1]) for i in inputs) + GREEDY.max_new_tokens
    running = engine(model, max_batch_tokens=2 * longest)
    run_schedule(running, {0: [submit(running, inputs[0])]})
    cache = running.prefix_cache
    assert cache is not None and cache.tokens > 0
    held = cache.tokens
    # Two rows at once need the whole budget: the cached prompt must go for both to be taken.
    jobs = [submit(running, one) for one in inputs]
    with running._cond:
        running._queue.extend(jobs)
    taken = running._take()
    assert len(taken) == 2 and held > 0 and cache.tokens == 0 and cache.stats.evictions >= 1


def test_prefix_cache_tree_splits_shares_and_evicts_least_recent() -> None:
    """The radix tree alone: shared starts are stored once, matches copy the right KV, and eviction
    takes the least recently used leaf first."""

    def kv(keys: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        values = torch.tensor(keys, dtype=torch.float32).view(1, 1, -1, 1)
        return [(values, -values)]

    cache = PrefixCache(capacity_tokens=100, bytes_per_token=8)
    a = np.array([1, 2, 3, 4, 5, 6], dtype=np.int64)
    b = np.array([1, 2, 3, 9, 9], dtype=np.int64)
    cache.insert(None, a, kv(a.tolist()))
    cache.insert(None, b, kv(b.tolist()))
    assert cache.tokens == 6 + 2 and cache.bytes == 8 * 8  # [1, 2, 3] held once
    found, layers = cache.match(None, np.array([1, 2, 3, 9, 7], dtype=np.int64), limit=5)
    assert found == 4 and layers[0][0].flatten().tolist() == [1, 2, 3, 9]
    assert layers[0][1].flatten().tolist() == [-1, -2, -3, -9]
    assert cache.match("an-adapter", a, limit=6)[0] == 0  # another adapter's KV differs
    assert cache.match(None, a, limit=3)[0] == 3
    cache.match(None, a, limit=6)  # a's leaf is now the most recent
    cache.shrink(cache.tokens - 1)
    assert cache.match(None, b, limit=5)[0] == 3 and cache.match(None, a, limit=6)[0] == 6
    assert cache.stats.evictions == 1
    cache.clear()
    assert cache.tokens == 0 and cache.match(None, a, limit=6)[0] == 0


def test_image_tokens_are_keyed_by_their_image() -> None:
    ids = [5, 7, 7, 7, 6, 7, 7, 8]
    types = [0, 1, 1, 1, 0, 1, 1, 0]
    keys = prompt_keys(ids, types, [111, 222], [3, 2])
    assert keys is not None
    assert keys.tolist() == [5, *[image_key(111)] * 3, 6, *[image_key(222)] * 2, 8]
    other = prompt_keys(ids, types, [111, 333], [3, 2])
    assert other is not None and other.tolist() != keys.tolist()
    assert prompt_keys(ids, [0, 2, 2, 2, 0, 0, 0, 0], [], []) is None  # video tokens: no keys
    assert prompt_keys(ids, types, [111], [3]) is None  # counts that do not add up


def test_encoder_cache_is_bounded_in_bytes_and_sized_per_device() -> None:
    cache = EncoderCache(capacity_bytes=3 * 4 * 10)
    for key in range(4):
        cache.put(key, torch.zeros(10, dtype=torch.float32))
    assert cache.bytes == 3 * 40 and cache.stats.evictions == 1 and cache.get(0) is None
    assert cache.get(3) is not None
    cache.put(99, torch.zeros(1000))  # larger than the whole cache: not kept
    assert cache.get(99) is None
    assert cache.get(1) is not None  # now the most recently used: 2 goes next, not 1
    cache.put(4, torch.zeros(10))
    assert cache.get(2) is None and cache.get(1) is not None
    assert encoder_cache_bytes(-1, "cuda:0") == 1024 << 20 and encoder_cache_bytes(-1, "cpu") == 256 << 20
    assert encoder_cache_bytes(0, "cuda:0") == 0 and encoder_cache_bytes(8, "cpu") == 8 << 20


def test_image_hashes_follow_the_pixels_not_the_tokens(model: LoadedModel) -> None:
    same = [chat(model, ["a"], [], [picture(50)]) for _ in range(2)]
    other = chat(model, ["a"], [], [picture(51)])
    assert image_hashes(same[0]) == image_hashes(same[1]) != image_hashes(other)
    two = chat(model, ["a"], [], [picture(50), picture(51)])
    assert image_hashes(two) == [*image_hashes(same[0]), *image_hashes(other)]


def test_the_three_caches_show_in_metrics_and_readyz(make_app: Any) -> None:
    """Through the app (in-worker engine): the worker's image cache, the encoder cache and the prefix
    cache each count a hit for a second question about one picture, in /metrics and /readyz."""
    import re

    from helpers import image_b64, vision_body

    app = make_app(cache="0")  # no response cache: the second question must reach the model
    with app.test_client() as client:
        same = image_b64(150, 110)
        # The first answer waits for the model to load; only then are images sized for it.
        for image, prompt in ((image_b64(60, 50), "Hello"), (same, "What is it?"), (same, "Its colour?")):
            response = client.post("/v1/chat/vision", json=vision_body(image=image, prompt=prompt))
            assert response.status_code == 200, response.get_json()
        counters = client.get("/readyz").get_json()["engine"]
        text = client.get("/metrics").get_data(as_text=True)

    def series(name: str) -> float:
        found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    assert counters["image_cache_hits"] == 1 and counters["image_cache_misses"] >= 2
    # (The model's warm-up answer at load is a miss too.)
    assert counters["prefix_hits"] == 1 and counters["prefix_misses"] >= 2
    assert counters["prefix_reused_tokens"] > 0 and counters["encoder_misses"] >= 2
    for cache in ("image", "prefix"):
        assert series(f'glmvision_model_cache_lookups_total{{cache="{cache}",result="hit"}}') == 1, cache
        assert series(f'glmvision_model_cache_lookups_total{{cache="{cache}",result="miss"}}') >= 1, cache
    assert series("glmvision_prefix_cache_reused_tokens_total") == counters["prefix_reused_tokens"]
    assert series('glmvision_model_cache_bytes{cache="prefix"}') > 0
    assert series('glmvision_model_cache_bytes{cache="encoder"}') > 0
    assert series("glmvision_image_cache_bytes") > 0


def test_identical_prompts_prepared_apart_share_one_prefill(model: LoadedModel) -> None:
    """A request's n choices sent from a worker to an engine process arrive as separate inputs (so do two
    clients asking the same): prompts with the same keys are prefilled once, their tokens exact."""
    images = [picture(60)]
    same = [chat(model, [QUESTIONS[0]], [], images) for _ in range(3)]
    other = chat(model, [QUESTIONS[1]], [], images)
    assert same[0] is not same[1]
    running = engine(model, prefix_cache=False)
    jobs = [submit(running, inputs) for inputs in [*same, other]]
    run_schedule(running, {0: jobs})
    assert running.stats.shared_prefills == 2
    want = alone(model, (same[0], GREEDY))
    assert [tokens(one.stream) for one in jobs[:3]] == [want] * 3
    assert tokens(jobs[3].stream) == alone(model, (other, GREEDY))
