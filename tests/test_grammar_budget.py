"""Grammar compilation has a budget: it runs in compiler processes that are killed past
GLMVISION_GRAMMAR_TIMEOUT (400 schema_too_complex), compiled grammars are cached within a byte
budget, and every walk over a grammar is bounded, so no schema can stall a worker or grow its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy
import pytest
import requests
from flask import Flask
from helpers import live_server, server_env, wait_for

from glmvision.backends.local.compiler import Abandoned, Busy, CompilerPool, GrammarLimits, TooLarge
from glmvision.backends.local.grammar import GrammarBook
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.backend import Admission, PreparationSlots
from glmvision.core.config import load_settings
from glmvision.core.errors import APIError
from glmvision.core.generation import Constraint

ROOT = Path(__file__).resolve().parent.parent
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
# Small, and within modest schema limits (24 properties, repetitions of 500), yet ~1 s to compile
# on the demo model's vocabulary (a real one's is 300x larger): far past the budgets below.
SLOW = {
    "type": "object",
    "properties": {f"p{i}": {"type": "string", "pattern": "^(a|b){500}$"} for i in range(24)},
    "required": [f"p{i}" for i in range(24)],
}
# Minutes to compile: only ever given a budget.
HOSTILE = {"type": "string", "pattern": "^a{20000}$"}
# Recursion with no way out: no document ends, and xgrammar's jump-forward search never returns.
ENDLESS = {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


def book(model: LoadedModel, **limits: Any) -> GrammarBook:
    """A grammar book of its own (its own compiler processes) with these GrammarLimits."""
    return GrammarBook(model.processor.tokenizer, 512, model.stop_ids, limits=GrammarLimits(**limits))


@pytest.fixture(scope="module")
def shared(model: LoadedModel) -> Iterator[GrammarBook]:
    grammars = book(model, timeout=5.0, workers=1)
    yield grammars
    grammars._pool.close()


def masks(grammar: Any, vocab_size: int, steps: list[int]) -> list[Any]:
    """The bitmask words before each of `steps` tokens (taken in turn), and whether it then ended."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
    seen = []
    for token_id in steps:
        matcher.fill_next_token_bitmask(bitmask)
        seen.append(bitmask[0].tolist())
        assert matcher.accept_token(token_id)
    return [*seen, matcher.is_terminated()]


def greedy_path(grammar: Any, vocab_size: int, length: int) -> list[int]:
    """The lowest allowed token at each of `length` steps: a valid path through the grammar."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
    path = []
    for _ in range(length):
        if matcher.is_terminated():
            break
        matcher.fill_next_token_bitmask(bitmask)
        bits = numpy.unpackbits(bitmask[0].numpy().view(numpy.uint8), bitorder="little")[:vocab_size]
        allowed = numpy.flatnonzero(bits)
        token_id = int(allowed[min(len(allowed) - 1, len(path) % 3)])
        assert matcher.accept_token(token_id)
        path.append(token_id)
    return path


@pytest.mark.parametrize(
    "constraint",
    [Constraint(json.dumps(PERSON)), Constraint(None), Constraint(None, json.dumps(WEATHER), "tools")],
    ids=["schema", "object", "tools"],
)
def test_a_grammar_from_a_compiler_process_masks_as_one_compiled_here(
    shared: GrammarBook, constraint: Constraint
) -> None:
    import xgrammar

    kind, text = shared._source(constraint)
    compiler = xgrammar.GrammarCompiler(shared._infos[kind], max_threads=1, cache_enabled=False)
    if kind == "json":
        here = compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
    else:
        here = compiler.compile_structural_tag(text)
    there = shared.compile(constraint).grammar
    path = greedy_path(here, 512, 24)
    assert len(path) >= 3
    assert masks(there, 512, path) == masks(here, 512, path)


def test_a_compile_past_the_budget_is_a_400_and_kills_its_process(model: LoadedModel) -> None:
    grammars = book(model, timeout=0.2, workers=1)
    try:
        grammars.compile(Constraint(json.dumps(PERSON)))  # the compiler process is started and warm
        (process,) = grammars._pool._idle
        started = time.monotonic()
        with pytest.raises(APIError) as refused:
            grammars.compile(Constraint(json.dumps(SLOW), param="response_format"))
        elapsed = time.monotonic() - started
        assert (refused.value.code, refused.value.error_code) == (400, "schema_too_complex")
        assert refused.value.param == "response_format"
        assert "GLMVISION_GRAMMAR_TIMEOUT" in str(refused.value.description)
        assert elapsed < 20, "not stopped at its budget"  # generous: it proves "stopped", not speed
        assert process.process.poll() is not None, "the compiler process still runs"
        assert grammars._pool.killed == 1
        # Its successor starts at once, in the background, and lives on.
        assert wait_for(lambda: len(grammars._pool._idle) == 1, timeout=90)  # a fresh interpreter, loaded box
        successor = grammars._pool._idle[0].process
        time.sleep(0.5)
        assert successor.poll() is None
        # A fresh process takes the next schema; the cached one needs none.
        assert grammars.compile(Constraint(json.dumps({"type": "integer"}))).grammar is not None
        assert grammars.compile(Constraint(json.dumps(PERSON))).grammar is not None
        assert (grammars.compiled, grammars.hits) == (2, 1)
    finally:
        grammars._pool.close()


def test_a_hung_up_client_stops_its_compile(model: LoadedModel) -> None:
    grammars = book(model, timeout=30.0, workers=1)
    try:
        grammars.compile(Constraint(json.dumps(PERSON)))
        hang_up = time.monotonic() + 0.3
        with pytest.raises(APIError) as stopped:
            grammars.compile(Constraint(json.dumps(HOSTILE)), gone=lambda: time.monotonic() > hang_up)
        assert stopped.value.error_code == "client_closed"
        assert time.monotonic() - hang_up < 20  # stopped, not left to run its course
        assert grammars._pool.killed == 1
        # So does a request whose deadline passes.
        with pytest.raises(APIError) as late:
            grammars.compile(Constraint(json.dumps(HOSTILE)), deadline=time.monotonic() + 0.3)
        assert late.value.error_code == "request_timeout"
    finally:
        grammars._pool.close()


def test_the_cache_keeps_grammars_within_its_byte_budget(shared: GrammarBook, model: LoadedModel) -> None:
    person = shared.compile(Constraint(json.dumps(PERSON))).grammar.memory_size_bytes
    grammars = book(model, workers=1, cache_bytes=int(person * 1.5))
    try:
        small = Constraint(json.dumps({"type": "integer"}))
        grammars.compile(Constraint(json.dumps(PERSON)))
        grammars.compile(small)
        grammars.compile(small)
        assert (grammars.compiled, grammars.hits, grammars.evicted) == (2, 1, 0)
        assert grammars.cached_bytes <= person * 1.5
        grammars.compile(Constraint(json.dumps({**PERSON, "required": ["name"]})))  # the person goes
        assert grammars.evicted >= 1 and grammars.cached_bytes <= person * 1.5
        grammars.compile(Constraint(json.dumps(PERSON)))
        assert grammars.compiled == 4, "an evicted grammar is compiled again"
    finally:
        grammars._pool.close()


def test_identical_compiles_at_once_share_one(model: LoadedModel) -> None:
    grammars = book(model, timeout=30.0, workers=2)
    try:
        grammars.compile(Constraint(json.dumps(PERSON)))
        slowish = Constraint(json.dumps({"type": "string", "pattern": "^(a|b){600}$"}))
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: grammars.compile(slowish), range(4)))
        assert all(result is results[0] for result in results)
        assert (grammars.compiled, grammars.hits) == (2, 3)
    finally:
        grammars._pool.close()


def test_a_request_waits_for_a_free_compiler_only_so_long(shared: GrammarBook) -> None:
    pool: CompilerPool = shared._pool
    kind, slow = shared._source(Constraint(json.dumps(HOSTILE)))
    hang_up = threading.Event()

    def occupy() -> None:
        with pytest.raises(Abandoned):
            pool.compile(kind, slow, 30.0, time.monotonic() + 30, hang_up.is_set)

    worker = threading.Thread(target=occupy)
    worker.start()
    try:
        assert wait_for(lambda: pool._lent == 1)
        started = time.monotonic()
        with pytest.raises(Busy):
            pool.compile("json", '{"type": "integer"}', 0.3, time.monotonic() + 30)
        assert 0.25 < time.monotonic() - started < 20  # waited its budget, then gave up
    finally:
        hang_up.set()
        worker.join()
    assert pool.compile("json", '{"type": "integer"}', 5.0, time.monotonic() + 60)


def test_a_grammar_too_large_to_send_back_is_refused(shared: GrammarBook) -> None:
    pool = CompilerPool(shared._pool._vocabularies, workers=1, largest=4096)
    try:
        kind, person = shared._source(Constraint(json.dumps(PERSON)))
        with pytest.raises(TooLarge):
            pool.compile(kind, person, 5.0, time.monotonic() + 60)
        assert pool.compile("json", '{"type": "integer"}', 5.0, time.monotonic() + 60)
    finally:
        pool.close()


def test_a_compiler_that_cannot_start_is_a_503(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    grammars = book(model, workers=1)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the child exits at once
    try:
        with pytest.raises(APIError) as refused:
            grammars.compile(Constraint(json.dumps(PERSON)))
        assert (refused.value.code, refused.value.error_code) == (503, "grammar_busy")
        assert "Retry-After" in refused.value.headers
    finally:
        grammars._pool.close()


def test_a_request_lends_its_preparation_slot_while_its_grammar_compiles() -> None:
    """Compiling happens elsewhere: the slot a request prepares in is free for others meanwhile."""
    admission = Admission(8, 30.0, lambda: 0.0, slots=PreparationSlots(2, lambda: 0, 1))
    compiling, other, late = admission.admit(), admission.admit(), admission.admit()
    compiling.take_slot()
    other.take_slot()
    with compiling.slot_lent():
        late.take_slot()  # at once: without the loan it would wait for one of the two
        late.release()
    assert compiling._holds_slot
    with pytest.raises(APIError), compiling.slot_lent():
        raise APIError(400, "schema_too_complex", "no")
    assert not compiling._holds_slot  # an ended request takes none back
    compiling.release()
    other.release()


ORPHAN = """
import json, sys, time
from glmvision.backends.local.compiler import CompilerPool, Vocabularies

words = [bytes([i]) for i in range(256)]
pool = CompilerPool(Vocabularies(words, words, 256, [0]))
pool.compile("json", '{"type": "integer"}', 30.0, time.monotonic() + 120)
print(pool.processes()[0], flush=True)
pool.compile("json", sys.argv[1], 300.0, time.monotonic() + 300)
"""


def test_a_compiler_process_ends_with_its_worker(tmp_path: Path) -> None:
    """A worker killed mid-compile (by gunicorn's timeout, say) leaves no compile running."""
    worker = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, json.dumps(HOSTILE)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,  # where its glmvision is found: not on PYTHONPATH, so not by its compiler's either
        env={name: value for name, value in os.environ.items() if name != "PYTHONPATH"},
    )
    try:
        assert worker.stdout is not None
        compiler = int(worker.stdout.readline())
        time.sleep(0.3)
        assert running(compiler)
    finally:
        worker.kill()
        worker.wait()
    assert wait_for(lambda: not running(compiler), timeout=10)


def running(pid: int) -> bool:
    """Whether the process runs (a zombie left for an init that does not reap does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


WALK = """
import json, resource, sys, time
import torch
from glmvision.core.backend import Admission, PreparationSlots
from glmvision.core.config import load_settings
from glmvision.core.generation import Constraint
from glmvision.backends.local.loading import load_model

model = load_model(load_settings({"GLMVISION_MODEL": sys.argv[1], "GLMVISION_DEVICE": "cpu"}))
compiled = model.grammars().compile(Constraint(sys.argv[2]))
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), hard))  # 1 GiB more at most
row = compiled.start(300, after_thinking=False)
generator = torch.Generator().manual_seed(0)
started = time.perf_counter()
for step in range(300):
    logits = torch.randn(1, 512, generator=generator)
    forced = row.constrain(logits, step)
    token = forced if forced is not None else row.vet(int(torch.argmax(logits)), step)
    row.accept(token)
print(json.dumps({"active": row.active, "seconds": time.perf_counter() - started}))
"""


def test_every_walk_over_an_endless_grammar_is_bounded(demo_model_dir: Path) -> None:
    """The closing walk on a schema with no finite document neither loops nor grows: the row
    simply runs to its token budget (finish_reason length)."""
    result = subprocess.run(
        [sys.executable, "-c", WALK, str(demo_model_dir), json.dumps(ENDLESS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["active"] and outcome["seconds"] < 30


def chat(schema: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "Fill in the form."}],
        "max_tokens": 24,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "form", "schema": schema}},
        **fields,
    }


def test_a_slow_schema_is_a_400_within_about_the_budget(make_app: Callable[..., Flask]) -> None:
    app = make_app(grammar_timeout=0.1, grammar_workers=1)
    with app.test_client() as client:
        assert client.post("/v1/chat/completions", json=chat(PERSON)).status_code == 200  # a warm compiler
        started = time.monotonic()
        refused = client.post("/v1/chat/completions", json=chat(SLOW))
        elapsed = time.monotonic() - started
        assert refused.status_code == 400, refused.get_json()
        error = refused.get_json()["error"]
        assert (error["code"], error["param"]) == ("schema_too_complex", "response_format.json_schema.schema")
        assert elapsed < 20  # stopped at about its budget rather than compiling to the end
        answered = client.post("/v1/chat/completions", json=chat({**PERSON, "required": ["age"]}))
        assert answered.status_code == 200
        json.loads(answered.get_json()["choices"][0]["message"]["content"] or "{}")


def test_a_hostile_schema_on_gunicorn_stalls_no_one(
    tmp_path: Path, demo_model_dir: Path, runtime_dir: Path
) -> None:
    """A schema that would compile for minutes gets its 400 in about the budget; a plain request sent
    at the same time is answered meanwhile, and the worker is the same one afterwards."""
    env = server_env(demo_model_dir, runtime_dir, GRAMMAR_TIMEOUT="0.5", GRAMMAR_WORKERS="2")
    with live_server(tmp_path, env, ready_path="/readyz") as server:
        workers = server.worker_pids()
        url = server.url + "/v1/chat/completions"
        assert requests.post(url, json=chat(PERSON), timeout=60).status_code == 200  # a warm compiler
        plain = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}

        def timed(body: dict[str, Any]) -> tuple[requests.Response, float]:
            started = time.monotonic()
            return requests.post(url, json=body, timeout=60), time.monotonic() - started

        with ThreadPoolExecutor(3) as pool:
            hostile = [pool.submit(timed, chat(schema)) for schema in (HOSTILE, SLOW)]
            time.sleep(0.2)
            answer, plain_seconds = timed(plain)
            refusals = [future.result() for future in hostile]
        assert answer.status_code == 200 and plain_seconds < 30, (answer.status_code, plain_seconds)
        for refused, seconds in refusals:
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["code"] == "schema_too_complex"
            assert seconds < 30, seconds
        assert requests.post(url, json=chat(PERSON), timeout=60).status_code == 200
        assert server.worker_pids() == workers, server.log()
