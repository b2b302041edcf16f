"""The wire to an engine process: messages, shared-memory tensors and zmq sockets, across two processes."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import multiprocessing
import os
import queue
import subprocess
import sys
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import zmq
from helpers import wait_for
from PIL import Image

from glmvision.backends.engine import shm
from glmvision.backends.engine.client import remote_error
from glmvision.backends.engine.process import RemoteSink, coalesce
from glmvision.backends.engine.shm import (
    PREFIX,
    SharedMemoryFull,
    SharedTensors,
    TensorsGone,
    open_tensors,
    share_tensors,
)
from glmvision.backends.engine.transport import (
    EngineConnection,
    EngineEndpoint,
    EngineUnreachable,
    Waker,
    socket_path,
)
from glmvision.backends.engine.wire import (
    PROTOCOL,
    Abort,
    HealthQuery,
    HealthReport,
    Message,
    Submit,
    TensorRef,
    Tokens,
    WireError,
    WireParams,
    decode,
    encode,
)
from glmvision.core.errors import api_error
from glmvision.core.generation import Constraint, GenerationParams, ToolChoice

WAIT_S = 30.0  # the bound on every wait for the other process (never reached when things work)

TOOLS = (
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city — «quoted», 雨",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
)

PARAMS = [
    GenerationParams(max_new_tokens=16),
    GenerationParams(max_new_tokens=1, temperature=0.0, seed=0),
    GenerationParams(max_new_tokens=64, temperature=0.0, top_p=0.9, seed=2**63 - 1, enable_thinking=True),
    GenerationParams(max_new_tokens=32, stop=("\n\n", "END", "é"), min_new_tokens=4, adapter="legal-v2"),
    GenerationParams(
        max_new_tokens=128,
        temperature=1.3,
        constraint=Constraint(schema='{"type":"object","properties":{"a":{"type":"integer"}}}'),
    ),
    GenerationParams(max_new_tokens=8, constraint=Constraint(), stop=("}",)),
    GenerationParams(
        max_new_tokens=200,
        tools=TOOLS,
        tool_choice=ToolChoice("function", "get_weather"),
        constraint=Constraint(tools='[{"name":"get_weather"}]', param="tool_choice"),
        seed=-5,
        adapter=None,
    ),
    GenerationParams(max_new_tokens=5, tools=TOOLS, tool_choice=ToolChoice("none")),
    GenerationParams(max_new_tokens=5, tools=TOOLS, tool_choice=ToolChoice("required"), temperature=1e-9),
]


def a_submit(request_id: str = "req-1") -> Submit:
    refs = (
        TensorRef("input_ids", "glmv_x", 0, "int64", (1, 12)),
        TensorRef("pv", "glmv_x", 128, "bfloat16", (4, 6)),
    )
    return Submit(request_id, refs, WireParams.of(PARAMS[6]), '{"grammar": "…"}', 12.5)


MESSAGES: list[Message] = [
    a_submit(),
    Submit("r", (), WireParams.of(PARAMS[0]), None, 0.0),
    Tokens("req-1", (5, 7, 151_000)),
    Tokens("req-1", (), end=True),
    Tokens("req-1", (9,), end=True, error_code="row_failed", error_message="CUDA error: device-side assert"),
    Tokens(
        "req-1", end=True, error_code="schema_unsupported", error_message="no", error_param="response_format"
    ),
    Abort("req-1"),
    HealthQuery(),
    HealthQuery(query_id=42),
    HealthReport(42, 1234, "cuda:0", "zai-org/GLM-4.6V-Flash", True, 3, 8, "ready"),
    HealthReport(0, 1, "cpu", "", False, 0, 0, "loading"),
    HealthReport(
        3,
        7,
        "cuda:1",
        "m",
        True,
        9,
        8,
        "ready",
        full=True,
        stalled_s=1.5,
        counters={"batches": 4, "x": "y"},
        gpu=(1, 2, 3),
        batches=((1, 5), (8, 2)),
        cache_empties=2,
    ),
]


def shm_exists(name: str | None) -> bool:
    assert name is not None
    return os.path.exists(f"/dev/shm/{name}")


# Messages.


@pytest.mark.parametrize("message", MESSAGES, ids=lambda message: type(message).__name__)
def test_every_message_round_trips(message: Message) -> None:
    assert decode(encode(message)) == message
    assert type(decode(encode(message))) is type(message)


def test_wire_params_carry_every_generation_params_field() -> None:
    # A field added to GenerationParams but not here would silently fall back to its default in the engine.
    assert set(WireParams.__struct_fields__) == {field.name for field in dataclasses.fields(GenerationParams)}


@pytest.mark.parametrize("params", PARAMS)
def test_generation_params_round_trip_losslessly(params: GenerationParams) -> None:
    back = decode(encode(Submit("r", (), WireParams.of(params), None, 1.0)))
    assert isinstance(back, Submit)
    restored = back.params.to_params()
    assert restored == params
    for field in dataclasses.fields(GenerationParams):  # types too: a tuple stays a tuple, an int an int
        assert type(getattr(restored, field.name)) is type(getattr(params, field.name)), field.name
    if params.constraint is not None:  # not in the constraint's equality, but its errors name it
        assert restored.constraint is not None and restored.constraint.param == params.constraint.param


def test_a_greedy_request_stays_greedy() -> None:
    restored = decode(encode(Submit("r", (), WireParams.of(PARAMS[8]), None, 1.0)))
    assert isinstance(restored, Submit) and restored.params.to_params().temperature == 0.0


def _raw(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


GOOD = msgspec.to_builtins(a_submit())  # a Submit as plain data, to spoil one part at a time
MALFORMED = {
    "empty": b"",
    "not msgpack": b"\xc1",
    "truncated": encode(a_submit())[:-5],
    "not a map": _raw([1, 2, 3]),
    "no tag": _raw({"request_id": "r"}),
    "unknown tag": _raw({"type": "shutdown_everything", "request_id": "r"}),
    "missing field": _raw({"type": "tokens"}),
    "wrong type": _raw({"type": "tokens", "request_id": "r", "token_ids": ["a"]}),
    "unknown field": _raw({"type": "abort", "request_id": "r", "force": True}),
    "negative offset": _raw(GOOD | {"tensors": [GOOD["tensors"][0] | {"offset": -1}]}),
    "unknown dtype": _raw(GOOD | {"tensors": [GOOD["tensors"][0] | {"dtype": "complex128"}]}),
    "negative dim": _raw(GOOD | {"tensors": [GOOD["tensors"][0] | {"shape": [1, -3]}]}),
    "bad tool_choice": _raw(GOOD | {"params": GOOD["params"] | {"tool_choice": {"mode": "sometimes"}}}),
    "bad state": _raw({**msgspec.to_builtins(MESSAGES[8]), "state": "on fire"}),
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(WireError, match=f"refused a frame of {len(frame)} bytes"):
        decode(frame)


def test_the_spoiled_frames_were_well_formed_before() -> None:
    # The malformed cases above differ from a valid Submit only where they say.
    assert decode(_raw(GOOD)) == a_submit()


# Tensors in shared memory.

DTYPES = [
    torch.int64,
    torch.int32,
    torch.int16,
    torch.uint8,
    torch.bool,
    torch.float32,
    torch.float16,
    torch.bfloat16,
]


def some(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.randn(shape) * 1000
    return values > 0 if dtype == torch.bool else values.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensors_cross_shared_memory_exactly(dtype: torch.dtype) -> None:
    tensors = {
        "matrix": some(dtype, (3, 5)),
        "odd": some(dtype, (7,)),  # an odd byte length, so the next offset needs aligning
        "transposed": some(dtype, (4, 6)).t(),  # not contiguous
        "scalar": some(dtype, ()),
        "empty": some(dtype, (0, 4)),
        "ids": torch.arange(11, dtype=torch.int64)[None],
    }
    shared, refs = share_tensors(tensors)
    with shared:
        assert all(ref.offset % 64 == 0 for ref in refs)
        opened = open_tensors(decode(encode(Submit("r", refs, WireParams.of(PARAMS[0]), None, 1.0))).tensors)
    assert opened.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert opened[name].dtype == tensor.dtype and opened[name].shape == tensor.shape, name
        assert torch.equal(opened[name], tensor), name


def test_a_real_processor_output_crosses(demo_model_dir: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_model_dir)
    image = Image.linear_gradient("L").convert("RGB").resize((96, 64))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert {"input_ids", "pixel_values", "image_grid_thw"} <= inputs.keys()
    shared, refs = share_tensors(dict(inputs))
    with shared:
        opened = open_tensors(refs)
    assert opened.keys() == inputs.keys()
    for name, tensor in inputs.items():
        assert opened[name].dtype == tensor.dtype and torch.equal(opened[name], tensor), name


def test_a_dtype_the_wire_lacks_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"'c'.*complex64"):
        share_tensors({"c": torch.zeros(2, dtype=torch.complex64)})


def test_no_block_is_left_after_an_exchange_or_an_unread_one() -> None:
    read, refs = share_tensors({"x": torch.ones(1000)})
    unread, _ = share_tensors({"x": torch.ones(1000)})
    names = [read.name, unread.name]
    assert all(name is not None and name.startswith(PREFIX) and shm_exists(name) for name in names)
    open_tensors(refs)
    # The reader unlinks the name as it opens: a worker that dies after sending leaves nothing.
    assert not shm_exists(read.name)
    read.release()
    unread.release()
    unread.release()  # idempotent
    assert not any(shm_exists(name) for name in names)
    with pytest.raises(TensorsGone, match=str(names[0])):
        open_tensors(refs)


def test_a_killed_worker_leaves_no_block() -> None:
    # The worker's resource tracker unlinks its blocks when it dies, however it dies.
    script = (
        "import os, signal, sys, torch\n"
        "from glmvision.backends.engine.shm import share_tensors\n"
        "shared, refs = share_tensors({'x': torch.ones(4096)})\n"
        "print(shared.name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == -9, done.stderr
    name = done.stdout.strip()
    assert name.startswith(PREFIX)
    assert wait_for(lambda: not shm_exists(name), timeout=WAIT_S), f"{name} was left in /dev/shm"


def test_a_full_dev_shm_is_an_error_not_a_sigbus(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real = shm.shared_memory.SharedMemory

    def recording(*args: Any, **kwargs: Any) -> Any:
        block = real(*args, **kwargs)
        made.append(block.name)
        return block

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm.shared_memory, "SharedMemory", recording)
    monkeypatch.setattr(shm.os, "posix_fallocate", no_room)
    with pytest.raises(SharedMemoryFull, match="no room for 4000 bytes"):
        share_tensors({"x": torch.ones(1000)})
    assert made and not shm_exists(made[0])  # the half-made block is gone


def test_nothing_empty_needs_a_block() -> None:
    shared, refs = share_tensors({})
    assert shared.name is None and refs == () and open_tensors(refs) == {}
    shared.release()


# Sockets.


def test_socket_paths_are_private_and_short(tmp_path: Path) -> None:
    path = socket_path(tmp_path / "run", 3)
    assert path.name == "engine-3.sock" and (path.parent.stat().st_mode & 0o777) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(PermissionError, match="0700"):
        socket_path(open_dir, 0)
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        socket_path(tmp_path / ("d" * 120), 0)


def test_endpoint_drops_bad_frames_and_reads_on(tmp_path: Path) -> None:
    path = socket_path(tmp_path / "run", 0)
    with EngineEndpoint(path) as endpoint, EngineConnection(path) as connection:
        assert endpoint.receive(0.05) is None  # a bounded wait, nothing there
        raw = zmq.Context()
        spoiler = raw.socket(zmq.DEALER)
        spoiler.setsockopt(zmq.LINGER, 0)
        spoiler.setsockopt(zmq.ROUTING_ID, b"spoiler")
        spoiler.connect(f"ipc://{path}")
        # One peer's frames arrive in order: the three bad ones before the good one.
        spoiler.send(b"\xc1garbage")
        spoiler.send_multipart([b"two", b"frames"])
        spoiler.send(_raw({"type": "abort"}))
        spoiler.send(encode(HealthQuery(5)))
        assert endpoint.receive(WAIT_S) == (b"spoiler", HealthQuery(5))
        assert endpoint.refused == 3
        spoiler.close()
        raw.term()
        connection.send(HealthQuery(7))
        assert endpoint.receive(WAIT_S) == (connection.identity, HealthQuery(7))
        endpoint.send(connection.identity, HealthReport(7, 1, "cpu", "m", True, 0, 0, "ready"))
        reply = connection.receive(WAIT_S)
        assert isinstance(reply, HealthReport) and reply.query_id == 7
        with pytest.raises(EngineUnreachable, match="gone"):
            endpoint.send(b"nobody", Tokens("r", end=True))
    assert not path.exists()  # closing removes the socket file


# Two processes: an echo engine answers each Submit with the last input ids, one message each.


def echo_engine(path: str, ready: Event, stop: Event) -> None:
    """Stream the input_ids' last 3 values (cycled to max_new_tokens) per Submit, one Tokens each."""
    streams: dict[tuple[bytes, str], Any] = {}
    with EngineEndpoint(path) as endpoint:
        ready.set()
        while not stop.is_set():
            got = endpoint.receive(0.001 if streams else 0.1)
            if got is not None:
                peer, message = got
                if isinstance(message, Submit):
                    ids = open_tensors(message.tensors)["input_ids"][0, -3:].tolist()
                    count = message.params.max_new_tokens
                    streams[peer, message.request_id] = iter(itertools.islice(itertools.cycle(ids), count))
                elif isinstance(message, Abort):
                    if streams.pop((peer, message.request_id), None) is not None:
                        endpoint.send(peer, Tokens(message.request_id, end=True))
                elif isinstance(message, HealthQuery):
                    report = HealthReport(
                        message.query_id, os.getpid(), "cpu", "echo", True, 0, len(streams), "ready"
                    )
                    endpoint.send(peer, report)
            for (peer, request_id), tokens in list(streams.items()):
                token = next(tokens, None)
                if token is None:
                    del streams[peer, request_id]
                    endpoint.send(peer, Tokens(request_id, end=True))
                else:
                    endpoint.send(peer, Tokens(request_id, (token,)))
            if streams:
                time.sleep(0.001)  # pacing, so that an endless stream does not flood the worker


def test_two_processes_stream_and_abort(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    path = socket_path(tmp_path / "run", 0)
    engine = context.Process(target=echo_engine, args=(str(path), ready, stop), daemon=True)
    engine.start()
    blocks: dict[str, SharedTensors] = {}
    try:
        assert ready.wait(120), "the engine process did not start"
        with EngineConnection(path) as connection:
            connection.send(HealthQuery(1))
            report = connection.receive(WAIT_S)
            assert (
                isinstance(report, HealthReport) and report.pid == engine.pid and report.protocol == PROTOCOL
            )

            def submit(request_id: str, ids: list[int], max_new_tokens: int) -> None:
                inputs = {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(64, 1176)}
                blocks[request_id], refs = share_tensors(inputs)
                params = WireParams.of(GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
                connection.send(Submit(request_id, refs, params, None, 30.0))

            submit("short", [1, 2, 3, 40, 50, 60], 3)
            submit("endless", [7, 8, 9], 10**9)
            got: dict[str, list[int]] = {"short": [], "endless": []}
            ended: set[str] = set()
            aborted = False
            while ended != {"short", "endless"}:
                message = connection.receive(WAIT_S)
                assert isinstance(message, Tokens), f"no Tokens within {WAIT_S} s: {message!r}"
                assert message.request_id not in ended and message.error_code is None
                blocks[message.request_id].release()  # the engine has opened it: the worker unlinks
                got[message.request_id].extend(message.token_ids)
                if message.end:
                    ended.add(message.request_id)
                if not aborted and len(got["endless"]) >= 2:
                    connection.send(Abort("endless"))
                    aborted = True
            assert got["short"] == [40, 50, 60]
            assert aborted and 2 <= len(got["endless"]) < 10**9
            assert got["endless"] == list(itertools.islice(itertools.cycle([7, 8, 9]), len(got["endless"])))
            connection.send(HealthQuery(2))
            report = connection.receive(WAIT_S)
            assert isinstance(report, HealthReport) and report.query_id == 2 and report.running == 0
    finally:
        stop.set()
        engine.join(WAIT_S)
        if engine.is_alive():
            engine.kill()
        for shared in blocks.values():
            shared.release()
    assert engine.exitcode == 0
    assert not any(shm_exists(shared.name) for shared in blocks.values() if shared.name)
    assert not path.exists()


def test_an_engine_error_keeps_its_param_across_the_wire() -> None:
    posted: list[tuple[bytes, Message]] = []
    sink = RemoteSink("req-1", b"w1", 5, lambda peer, message, urgent: posted.append((peer, message)))
    sink.fail(api_error("schema_unsupported", "That schema is not supported.", "response_format"))
    ((peer, message),) = posted
    received = decode(encode(message))
    assert peer == b"w1" and isinstance(received, Tokens) and received.end
    error = remote_error(received.error_code or "", received.error_message, received.error_param)
    assert (error.error_code, error.param, error.code) == ("schema_unsupported", "response_format", 400)
    assert error.description == "That schema is not supported."


def test_queued_tokens_go_as_one_message_per_request_in_order() -> None:
    outbox: queue.SimpleQueue[tuple[bytes, Message]] = queue.SimpleQueue()
    for peer, message in [
        (b"w1", Tokens("a", (1,), cached_tokens=40)),  # the first message says what the prefix cache gave
        (b"w2", Tokens("b", (10,))),
        (b"w1", HealthReport(1, 1, "cpu", "", True, 0, 2, "ready")),
        (b"w1", Tokens("a", (2, 3))),
        (b"w2", Tokens("b", (11,), end=True, error_code="row_failed")),
        (b"w1", Tokens("a", (4,))),
        (b"w2", Tokens("c", (5,), end=True)),
    ]:
        outbox.put((peer, message))
    sent = coalesce(outbox)
    assert sent == [
        (b"w1", Tokens("a", (1, 2, 3, 4), cached_tokens=40)),
        (b"w2", Tokens("b", (10, 11), end=True, error_code="row_failed")),
        (b"w1", HealthReport(1, 1, "cpu", "", True, 0, 2, "ready")),
        (b"w2", Tokens("c", (5,), end=True)),
    ]
    assert outbox.empty()
    # A request's tokens after its end are another message (they would be a bug, but not merged away).
    outbox.put((b"w1", Tokens("d", (1,), end=True)))
    outbox.put((b"w1", Tokens("d", (2,))))
    assert [message for _, message in coalesce(outbox)] == [Tokens("d", (1,), end=True), Tokens("d", (2,))]


def test_a_waker_ends_a_socket_wait_early(tmp_path: Path) -> None:
    waker = Waker()
    try:
        with EngineEndpoint(socket_path(tmp_path / "run", 0), waker=waker) as endpoint:
            threading.Timer(0.05, waker.wake).start()
            started = time.monotonic()
            assert endpoint.receive(WAIT_S) is None  # woken, with nothing to read
            assert time.monotonic() - started < WAIT_S
            waker.clear()
            assert endpoint.receive(0.01) is None  # cleared: the wait runs to its bound
    finally:
        waker.close()


def test_an_engine_runs_on_the_device_the_master_gave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvision.backends.engine.process import engine_settings

    monkeypatch.setenv("GLMVISION_DEVICE", "cuda")
    assert engine_settings("cuda:1").device == "cuda:1"
    assert engine_settings("").device == "cuda"  # none chosen: the operator's


def pool_with_loads(loads: list[int | None]) -> Any:
    """An EnginePool whose engines last reported these loads (None: still loading); no sockets opened."""
    from glmvision.backends.engine.client import EnginePool

    pool = EnginePool([f"/nowhere/{i}" for i in range(len(loads))], decoder=None, on_batch=lambda rows: None)  # type: ignore[arg-type]
    for engine, load in zip(pool.engines, loads, strict=True):
        ready = load is not None
        engine.report = HealthReport(1, 1, "cpu", "m", ready, 0, load or 0, "ready" if ready else "loading")
        engine.reported_at = time.monotonic()
    return pool


def test_the_pool_sends_to_the_least_loaded_ready_engine() -> None:
    pool = pool_with_loads([5, 2, None, 3])
    assert {pool.engines.index(pool.pick()) for _ in range(8)} == {1}
    pool.engines[1].sent_since_report = 4  # what this worker sent since the report counts too
    assert {pool.engines.index(pool.pick()) for _ in range(8)} == {3}


def test_ties_take_turns_so_one_request_at_a_time_spreads_over_the_engines() -> None:
    pool = pool_with_loads([0, 0, None, 0])
    picks = [pool.engines.index(pool.pick()) for _ in range(9)]
    assert sorted(set(picks)) == [0, 1, 3] and all(picks.count(i) == 3 for i in (0, 1, 3)), picks
