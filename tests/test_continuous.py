"""The continuous scheduler on the real tiny model: rows joining and leaving at any step, per-row sampling.

The reference for every row is what transformers' own generate() gives for that request alone.
Schedules are driven step by step from the test thread (no model thread), so which row joins at
which step is exact; the threaded tests at the end go through submit() as requests do.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import image_b64, wait_for
from PIL import Image

from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.engine import Job
from glmvision.backends.local.kvcache import PaddedCache, kv_bytes_per_token, kv_token_budget
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.backends.local.sampling import RowSampling, choose_tokens, warped_probabilities
from glmvision.backends.local.static import StaticEngine
from glmvision.core.backend import Admission
from glmvision.core.config import load_settings
from glmvision.core.errors import APIError
from glmvision.core.generation import GenerationParams
from glmvision.postprocess.stream import GenerationStream
from glmvision.web.state import app_state

WORDS = "what is in this picture describe the colours shapes and any text you can read please".split()


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


def engine(model: LoadedModel, **overrides: Any) -> ContinuousEngine:
    settings = load_settings({f"GLMVISION_{k.upper()}": v for k, v in overrides.items()})
    return ContinuousEngine(model, settings)


ADMISSION = Admission(10_000, 600, lambda: 0.0)


def inputs(model: LoadedModel, sizes: list[tuple[int, int]], prompt: str) -> Any:
    content: list[dict[str, Any]] = [
        {"type": "image", "image": Image.new("RGB", size, (size[0] % 256, 80, size[1] % 256))}
        for size in sizes
    ]
    content.append({"type": "text", "text": prompt})
    return model.prepare([{"role": "user", "content": content}], enable_thinking=False)


def job(engine: ContinuousEngine | StaticEngine, request: tuple[Any, GenerationParams]) -> Job:
    return engine._job(request[0], request[1], ADMISSION.admit())


def tokens(stream: GenerationStream) -> list[int]:
    for _ in stream:
        pass
    return stream.token_ids


def alone(model: LoadedModel, request: tuple[Any, GenerationParams]) -> list[int]:
    """The request's tokens from transformers' generate(), alone."""
    static = StaticEngine(model, load_settings({"GLMVISION_MAX_BATCH_SIZE": 1}))
    one = job(static, request)
    static._serve_alone(one)
    return tokens(one.stream)


def run_schedule(engine: ContinuousEngine, joining: dict[int, list[Job]]) -> int:
    """Join each list of jobs before the step its key names, step until every row is done; steps run."""
    step = 0
    while joining or engine._rows:
        if step in joining:
            engine._join(joining.pop(step))
        if engine._rows:
            engine._step()
        step += 1
        assert step < 10_000
    return step


def random_request(model: LoadedModel, rng: random.Random) -> tuple[Any, GenerationParams]:
    sizes = [(rng.randrange(28, 170), rng.randrange(28, 170)) for _ in range(rng.choice([0, 1, 1, 2]))]
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 25)))
    limit = rng.randrange(2, 28)
    # Some rows run to their limit, others may stop early on a stop token, as the model decides.
    least = limit if rng.random() < 0.5 else 0
    return inputs(model, sizes, prompt), GenerationParams(
        max_new_tokens=limit, min_new_tokens=least, temperature=0
    )


def test_greedy_rows_equal_generate_alone_over_many_random_schedules(model: LoadedModel) -> None:
    """Rows join at random steps, with random prompts, image sizes and counts (none too), and leave
    at their own ends: every row's tokens are exactly what generate() gives it alone."""
    rng = random.Random(20261201)
    checked = joined_late = text_only = multi_image = 0
    for _ in range(8):
        requests = [random_request(model, rng) for _ in range(rng.randrange(2, 7))]
        expected = [alone(model, request) for request in requests]
        running = engine(model, max_batch_size=16)
        jobs = [job(running, request) for request in requests]
        joining: dict[int, list[Job]] = {}
        for one in jobs:
            joining.setdefault(rng.choice([0, 0, 1, 2, 3, 5, 8, 13]), []).append(one)
        joined_late += sum(len(group) for step, group in joining.items() if step > 0)
        run_schedule(running, joining)
        for one, want in zip(jobs, expected, strict=True):
            assert tokens(one.stream) == want
            checked += 1
        text_only += sum("pixel_values" not in request[0] for request in requests)
        multi_image += sum(len(request[0].get("image_grid_thw", [])) > 1 for request in requests)
    assert checked >= 20 and joined_late >= 10 and text_only >= 2 and multi_image >= 2


def run_cycles(engine: ContinuousEngine, arriving: dict[int, list[Job]]) -> None:
    """Queue each list of jobs before the cycle its key names and run the model thread's cycles."""
    cycle = 0
    while arriving or engine._rows or engine._chunked or engine._queue:
        with engine._cond:
            engine._queue.extend(arriving.pop(cycle, []))
        if engine._queue or engine._rows or engine._chunked:
            engine._cycle()
        cycle += 1
        assert cycle < 10_000


def test_greedy_rows_stay_exact_when_long_prompts_are_prefilled_in_chunks(model: LoadedModel) -> None:
    """Through the cycle itself, with prefill budgets small enough that most prompts are chunked."""
    rng = random.Random(8)
    chunked = 0
    for _ in range(5):
        requests = [random_request(model, rng) for _ in range(rng.randrange(2, 6))]
        expected = [alone(model, request) for request in requests]
        running = engine(model, max_batch_size=16, batch_wait_ms=0, max_prefill_tokens=rng.randrange(8, 48))
        jobs = [job(running, request) for request in requests]
        arriving: dict[int, list[Job]] = {}
        for one in jobs:
            arriving.setdefault(rng.choice([0, 1, 4, 9]), []).append(one)
        chunked += sum(one.prompt_tokens > running.prefill_tokens for one in jobs)
        run_cycles(running, arriving)
        assert [tokens(one.stream) for one in jobs] == expected
    assert chunked >= 8


def test_a_chunked_prefill_costs_the_batch_one_chunk_a_cycle(model: LoadedModel) -> None:
    """While a long prompt is prefilled, the rows already running decode a step every cycle."""
    short = (inputs(model, [(40, 40)], "hi"), GenerationParams(40, temperature=0, min_new_tokens=40))
    long = (inputs(model, [(160, 160), (90, 120)], "describe " * 30), GenerationParams(6, temperature=0))
    expected = [alone(model, short), alone(model, long)]
    running = engine(model, max_prefill_tokens=32, batch_wait_ms=0)
    first, second = job(running, short), job(running, long)
    running._join([first])
    with running._cond:
        running._queue.append(second)
    steps, cycles = running.stats.steps, 0
    while second.generated == 0:
        running._cycle()
        cycles += 1
    assert cycles == -(-second.prompt_tokens // 32) and cycles > 3  # one chunk of 32 tokens a cycle
    assert running.stats.steps - steps == cycles and running.stats.largest_batch == 2
    run_cycles(running, {})
    assert [tokens(first.stream), tokens(second.stream)] == expected


def test_a_row_leaving_early_leaves_the_others_exact(model: LoadedModel) -> None:
    """A client that goes away mid-answer: its row is dropped and the cache cut; the rest are untouched."""
    requests = [
        (inputs(model, [(64, 48)], "what is this"), GenerationParams(20, temperature=0, min_new_tokens=20)),
        (
            inputs(model, [(150, 40)], "describe " * 12),
            GenerationParams(20, temperature=0, min_new_tokens=20),
        ),
        (inputs(model, [], "hi"), GenerationParams(20, temperature=0, min_new_tokens=20)),
    ]
    expected = [alone(model, request) for request in requests]
    running = engine(model)
    jobs = [job(running, request) for request in requests]
    running._join(jobs)
    for _ in range(5):
        running._step()
    jobs[1].stream.close()  # the longest prompt leaves: the padding in front of the others is cut
    length = running._cache.length if running._cache else 0
    running._step()
    assert len(running._rows) == 2 and running._cache is not None and running._cache.length < length
    run_schedule(running, {})
    assert tokens(jobs[0].stream) == expected[0] and tokens(jobs[2].stream) == expected[2]
    left = tokens(jobs[1].stream)
    assert 5 <= len(left) < 20 and left == expected[1][: len(left)]


def test_a_seeded_sample_is_the_same_whoever_shares_its_batch(model: LoadedModel) -> None:
    seeded = (
        inputs(model, [(64, 64)], "tell me"),
        GenerationParams(16, temperature=1.0, seed=7, min_new_tokens=16),
    )
    first = engine(model)
    one = job(first, seeded)
    run_schedule(first, {0: [one]})
    by_itself = tokens(one.stream)

    others = [
        (
            inputs(model, [(90, 30)], "something else entirely"),
            GenerationParams(16, temperature=1.5, top_p=0.9),
        ),
        (inputs(model, [], "text"), GenerationParams(16, temperature=0)),
        (inputs(model, [(40, 40)], "x"), GenerationParams(16, temperature=0.7, seed=99)),
    ]
    crowded = engine(model)
    again = job(crowded, seeded)
    run_schedule(
        crowded,
        {0: [job(crowded, others[0])], 2: [again, job(crowded, others[1])], 4: [job(crowded, others[2])]},
    )
    assert tokens(again.stream) == by_itself
    another_seed = (seeded[0], GenerationParams(16, temperature=1.0, seed=8, min_new_tokens=16))
    third = engine(model)
    differs = job(third, another_seed)
    run_schedule(third, {0: [differs]})
    assert tokens(differs.stream) != by_itself  # the seed is what decides, not chance


def test_rows_with_different_settings_share_one_batch(model: LoadedModel) -> None:
    settings = [
        GenerationParams(6, temperature=0, min_new_tokens=6),
        GenerationParams(6, temperature=0.3, top_p=0.5, min_new_tokens=6),
        GenerationParams(6, temperature=1.5, min_new_tokens=6),
        GenerationParams(6, temperature=0.9, seed=3, min_new_tokens=6),
    ]
    running = engine(model)
    jobs = [job(running, (inputs(model, [(64, 48)], "what"), params)) for params in settings]
    run_schedule(running, {0: jobs})
    assert running.stats.batches == 1 and running.stats.largest_batch == 4
    assert [len(tokens(one.stream)) for one in jobs] == [6, 6, 6, 6]


def test_the_kv_budget_keeps_newcomers_waiting_until_rows_leave(model: LoadedModel) -> None:
    request = (inputs(model, [(64, 48)], "what"), GenerationParams(12, temperature=0, min_new_tokens=12))
    per_row = int(request[0]["input_ids"].shape[1]) + 12
    running = engine(model, max_batch_tokens=2 * per_row)
    jobs = [job(running, request) for _ in range(3)]
    with running._cond:
        running._queue.extend(jobs)
    assert running._take() == jobs[:2]  # two at full length fit; the third would not
    running._join(jobs[:2])
    running._step()
    assert running._take() == []  # still no room while both run
    run_schedule(running, {})
    assert running._take() == [jobs[2]]


def test_the_prefill_cap_spreads_newcomers_over_cycles_but_one_always_fits(model: LoadedModel) -> None:
    request = (inputs(model, [(64, 48)], "what"), GenerationParams(4, temperature=0))
    prompt = int(request[0]["input_ids"].shape[1])
    running = engine(model, max_prefill_tokens=prompt * 2)
    jobs = [job(running, request) for _ in range(5)]
    with running._cond:
        running._queue.extend(jobs)
    assert running._take() == jobs[:2]
    capped = engine(model, max_prefill_tokens=1)  # smaller than any prompt: one per cycle still
    with capped._cond:
        capped._queue.extend(job(capped, request) for _ in range(2))
    assert len(capped._take()) == 1


def test_a_short_request_is_answered_while_long_ones_run(model: LoadedModel) -> None:
    """Through the model thread: the short answer ends while every long row is still generating."""
    running = engine(model)
    # Four rows at full length fit the default KV budget (16384 tokens), so all may run at once.
    long = GenerationParams(3500, temperature=0, min_new_tokens=3500)
    longs = [running.submit(inputs(model, [(64, 48)], "go on"), long, ADMISSION.admit()) for _ in range(3)]
    try:
        assert wait_for(lambda: running.stats.rows == 3 and running.stats.steps > 0)  # all three generate
        short = running.submit(
            inputs(model, [(40, 40)], "hi"), GenerationParams(8, temperature=0), ADMISSION.admit()
        )
        answer = short.whole()
        assert 1 <= answer.completion_tokens <= 8
        assert all(not stream._ended.is_set() for stream in longs)
        assert running.stats.largest_batch == 4
    finally:
        for stream in longs:
            stream.close()
    for stream in longs:
        for _ in stream:
            pass
        assert stream.result is not None and stream.result.finish_reason == "length"


def _fail_layer_when(model: LoadedModel, monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """The second decoder layer runs out of memory on a decode step of more than `rows` rows, after the
    first layer has already grown its cache."""
    layer = model.model.model.language_model.layers[1]
    real = layer.forward

    def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        if hidden_states.shape[0] > rows and hidden_states.shape[1] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(hidden_states, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", forward)


def test_out_of_memory_on_a_step_evicts_the_newest_rows_and_the_rest_stay_exact(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [
        (inputs(model, [(64, 48)], "what " * n), GenerationParams(10, temperature=0, min_new_tokens=10))
        for n in (1, 5, 9, 2)
    ]
    expected = [alone(model, request) for request in requests]
    _fail_layer_when(model, monkeypatch, rows=2)
    running = engine(model)
    held = ADMISSION.active
    jobs = [job(running, request) for request in requests]
    run_schedule(running, {0: jobs})
    assert running.stats.oom_evictions == 2
    assert tokens(jobs[0].stream) == expected[0] and tokens(jobs[1].stream) == expected[1]
    for evicted in jobs[2:]:
        with pytest.raises(APIError) as caught:
            tokens(evicted.stream)
        assert (caught.value.code, caught.value.error_code) == (503, "gpu_out_of_memory")
    assert ADMISSION.active == held  # every place was given back


def test_out_of_memory_in_a_prefill_retries_in_halves(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = model.model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        fed = kwargs["inputs_embeds"] if kwargs.get("input_ids") is None else kwargs["input_ids"]
        if fed.shape[0] > 1 and fed.shape[1] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward)
    running = engine(model, prefix_cache=False)  # identical prompts would otherwise reuse each other
    params = GenerationParams(3, temperature=0, min_new_tokens=3)
    # Four different prompts: rows of one prompt would share a single prefill.
    jobs = [job(running, (inputs(model, [(64, 48)], f"what {i}"), params)) for i in range(4)]
    run_schedule(running, {0: jobs})
    assert [len(tokens(one.stream)) for one in jobs] == [3, 3, 3, 3]
    assert running.stats.oom_splits == 3 and running.stats.batches == 4


@pytest.mark.parametrize("scheduler", ["continuous", "static", None])
def test_the_setting_picks_the_scheduler_the_service_runs(make_app: Any, scheduler: str | None) -> None:
    """GLMVISION_SCHEDULER chooses the engine (continuous when unset); /readyz says which served."""
    app = make_app(**({"scheduler": scheduler} if scheduler else {}))
    client = app.test_client()
    body = {"image": image_b64(), "prompt": "What is in this picture?", "max_new_tokens": 4, "temperature": 0}
    assert client.post("/v1/chat/vision", json=body).status_code == 200
    # The answer can be out before the model thread has counted it.
    assert wait_for(lambda: client.get("/readyz").get_json()["engine"]["completed"] == 1)
    engine = client.get("/readyz").get_json()["engine"]
    want = scheduler or "continuous"
    assert engine["scheduler"] == want and engine["rows"] == 1
    assert (engine["steps"] > 0) == (want == "continuous")
    backend = app_state(app).service.backend
    assert type(backend.engine) is {"continuous": ContinuousEngine, "static": StaticEngine}[want]


# Units: sampling, the padded cache and the KV budget.


def test_min_new_tokens_bars_stop_tokens_per_row() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])  # token 1 (a stop token) is most likely
    rows = [RowSampling(0.0, 1.0, 3), RowSampling(0.0, 1.0, 0)]
    assert choose_tokens(logits, rows, [1, 1], torch.tensor([1])) == [2, 1]
    assert choose_tokens(logits, rows, [3, 1], torch.tensor([1])) == [1, 1]
    assert logits[0, 1] == 5.0  # the model's logits are left as they were


def test_warped_probabilities_match_transformers_warpers() -> None:
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 3
    for temperature, top_p in [(0.3, 0.5), (1.0, 0.9), (1.7, 1.0), (0.8, 0.05)]:
        ours = warped_probabilities(logits, torch.full((4,), temperature), torch.full((4,), top_p))
        theirs = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        assert torch.allclose(ours, theirs.softmax(dim=-1), atol=1e-6)


def _layer(rows: int, length: int, fill: float) -> SimpleNamespace:
    return SimpleNamespace(
        keys=torch.full((rows, 1, length, 2), fill), values=torch.full((rows, 1, length, 2), -fill)
    )


def test_padded_cache_joins_left_padded_and_cuts_unused_columns() -> None:
    mine = PaddedCache(SimpleNamespace(layers=[_layer(1, 5, 1.0)]), torch.ones((1, 5), dtype=torch.long))
    theirs = PaddedCache(SimpleNamespace(layers=[_layer(2, 3, 2.0)]), torch.ones((2, 3), dtype=torch.long))
    mine.join(theirs)
    assert (mine.rows, mine.length) == (3, 5)
    assert mine.mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    keys = mine.cache.layers[0].keys
    assert keys[1:, :, :2].abs().sum() == 0 and (keys[1:, :, 2:] == 2.0).all() and (keys[0] == 1.0).all()
    mine.grow()
    assert mine.length == 6 and mine.mask[:, -1].tolist() == [1, 1, 1]
    mine.truncate(5)
    assert mine.length == 5 and mine.cache.layers[0].keys.shape[2] == 5
    mine.keep([1, 2])  # the long row leaves: the two padding columns go with it
    assert (mine.rows, mine.length) == (2, 3) and mine.mask.tolist() == [[1, 1, 1]] * 2
    assert mine.cache.layers[0].values.shape == (2, 1, 3, 2) and (mine.cache.layers[0].values == -2.0).all()


def test_kv_size_of_glm_4_6v_flash_from_its_config() -> None:
    from transformers import Glm4vConfig

    # 40 layers x 2 KV heads x head_dim 128, keys and values, 2 bytes each in bf16: 40 KiB a token.
    assert kv_bytes_per_token(Glm4vConfig().text_config, 2) == 40 * 2 * 128 * 2 * 2 == 40_960
    gib = 1 << 30
    # 80 GB GPU with 19.2 GiB of weights: the 6 GiB reserve (8%) aside, the rest in 40 KiB tokens.
    free, total = int(74.5 * gib - 19.2 * gib), int(74.5 * gib)
    assert kv_token_budget(free, total, 40_960) == (free - int(0.08 * total)) // 40_960
    assert kv_token_budget(gib, 24 * gib, 40_960) == 0  # less free than the reserve: nothing


def test_row_sampling_keeps_each_requests_settings() -> None:
    row = RowSampling.for_params(GenerationParams(4, temperature=0.5, top_p=0.3, min_new_tokens=2), "cpu")
    assert (row.temperature, row.top_p, row.min_new_tokens, row.generator) == (0.5, 0.3, 2, None)
    assert RowSampling.for_params(GenerationParams(4, temperature=0.5), "cpu").top_p == 1.0
    seeded = RowSampling.for_params(GenerationParams(4, temperature=0.5, seed=11), "cpu")
    assert seeded.generator is not None and seeded.generator.initial_seed() == 11


def test_kv_size_uses_an_explicit_head_dim_and_counts_whole_bytes() -> None:
    config = SimpleNamespace(
        num_attention_heads=8, num_key_value_heads=2, hidden_size=512, num_hidden_layers=3
    )
    assert kv_bytes_per_token(config, 2) == 2 * 3 * 2 * 64 * 2
    assert isinstance(kv_bytes_per_token(config, 2), int)
    config.head_dim = 96  # larger than hidden_size / heads, as some configs set it
    assert kv_bytes_per_token(config, 4) == 2 * 3 * 2 * 96 * 4
    del config.num_key_value_heads  # no grouped-query attention: one KV head per head
    assert kv_bytes_per_token(config, 1) == 2 * 3 * 8 * 96


def test_the_memory_cap_reads_the_gpu_and_leaves_the_cpu_alone(
    monkeypatch: pytest.MonkeyPatch, model: LoadedModel
) -> None:
    from glmvision.backends.local.backend import make_engine
    from glmvision.backends.local.kvcache import memory_token_budget

    gib = 1 << 30
    asked: list[Any] = []

    def mem_get_info(device: Any) -> tuple[int, int]:
        asked.append(device)
        return 6 * gib, 24 * gib

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    stand_in = SimpleNamespace(
        dtype=torch.bfloat16, config=SimpleNamespace(text_config=model.model.config.text_config)
    )
    per_token = kv_bytes_per_token(model.model.config.text_config, 2)
    assert memory_token_budget(stand_in, "cuda:1") == kv_token_budget(6 * gib, 24 * gib, per_token)
    assert asked == [torch.device("cuda:1")]
    stand_in.dtype = torch.float32  # 4 bytes an element: half the tokens fit
    assert memory_token_budget(stand_in, "cuda:1") == kv_token_budget(6 * gib, 24 * gib, 2 * per_token)
    asked.pop()
    assert memory_token_budget(stand_in, "cpu") >= 1 << 60 and len(asked) == 1  # no cap, and CUDA never asked
    settings = load_settings({"GLMVISION_MAX_BATCH_TOKENS": 5000})
    assert make_engine(model, settings).max_tokens == 5000  # on the CPU the setting alone decides


@pytest.mark.parametrize("how", ["client_left", "deadline"])
def test_a_chunked_prompt_whose_client_leaves_or_time_runs_out_is_dropped(
    model: LoadedModel, how: str
) -> None:
    long = (inputs(model, [(160, 160)], "describe " * 30), GenerationParams(6, temperature=0))
    running = engine(model, max_prefill_tokens=16, batch_wait_ms=0)
    one = job(running, long)
    with running._cond:
        running._queue.append(one)
    running._cycle()
    assert running._chunked is not None and running._chunked.done == 16
    if how == "client_left":
        one.stream.close()
    else:
        one.ticket.deadline = time.monotonic() - 1
    running._cycle()
    assert running._chunked is None and one.finished and not running._rows
    if how == "deadline":
        with pytest.raises(APIError) as caught:
            tokens(one.stream)
        assert (caught.value.code, caught.value.error_code) == (504, "request_timeout")
    else:
        assert tokens(one.stream) == []
