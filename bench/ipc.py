#!/usr/bin/env python3
"""What the engine process's wire costs: a request's round trip and a streamed token's, against in-process.

A script, not a test. Starts one echo engine process (spawn) on an ipc:// socket, then measures:

- round trip: share a request's tensors (input_ids of 1024 tokens and a 1 MB or 16 MB pixel_values),
  send the Submit, the engine opens (copies) them and answers one Tokens, the worker unlinks the block;
  against the same shm share + open in one process (no sockets), and a direct call that only copies
  the tensors (what an in-process engine's device transfer costs at least);
- per streamed token: N Tokens messages of one id each, engine to worker, against a thread feeding a
  queue.SimpleQueue in one process.

Prints p50 microseconds. `.venv/bin/python bench/ipc.py [--rounds 200] [--tokens 2000]`
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from glmvision.backends.engine.shm import open_tensors, share_tensors
from glmvision.backends.engine.transport import EngineConnection, EngineEndpoint, socket_path
from glmvision.backends.engine.wire import Submit, Tokens, WireParams
from glmvision.core.generation import GenerationParams

WAIT_S = 30.0


def echo(path: str, ready: Event, stop: Event) -> None:
    """Answer a Submit with max_new_tokens 1 by one Tokens after opening its tensors; else stream N."""
    torch.set_num_threads(1)  # as in the worker: a copy's thread pool would wake for every request
    with EngineEndpoint(path) as endpoint:
        ready.set()
        while not stop.is_set():
            got = endpoint.receive(0.1)
            if got is None:
                continue
            peer, message = got
            if not isinstance(message, Submit):
                continue
            ids = open_tensors(message.tensors)["input_ids"]
            last = int(ids[0, -1])
            count = message.params.max_new_tokens
            for index in range(count):
                endpoint.send(peer, Tokens(message.request_id, (last + index,), end=index == count - 1))


def inputs(pixel_bytes: int) -> dict[str, torch.Tensor]:
    """A processor's output for one image: 1024 prompt tokens, pixel_values of about `pixel_bytes`."""
    patches = pixel_bytes // (1176 * 4)
    return {
        "input_ids": torch.randint(0, 150_000, (1, 1024)),
        "attention_mask": torch.ones(1, 1024, dtype=torch.int64),
        "pixel_values": torch.randn(patches, 1176),
        "image_grid_thw": torch.tensor([[1, 2, patches // 2]]),
    }


def p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def round_trips(connection: EngineConnection, tensors: dict[str, torch.Tensor], rounds: int) -> list[float]:
    params = WireParams.of(GenerationParams(max_new_tokens=1, temperature=0.0))
    times = []
    for index in range(rounds):
        start = time.perf_counter()
        shared, refs = share_tensors(tensors)
        connection.send(Submit(f"r{index}", refs, params, None, 30.0))
        reply = connection.receive(WAIT_S)
        shared.release()
        times.append(time.perf_counter() - start)
        assert isinstance(reply, Tokens) and reply.end, reply
    return times


def in_process(tensors: dict[str, torch.Tensor], rounds: int) -> tuple[list[float], list[float]]:
    shm_times, copy_times = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        shared, refs = share_tensors(tensors)
        opened = open_tensors(refs)
        shared.release()
        shm_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        opened = {name: tensor.clone() for name, tensor in tensors.items()}
        copy_times.append(time.perf_counter() - start)
        del opened
    return shm_times, copy_times


def streamed(connection: EngineConnection, tokens: int, rounds: int) -> list[float]:
    params = WireParams.of(GenerationParams(max_new_tokens=tokens, temperature=0.0))
    per_token = []
    for index in range(rounds):
        shared, refs = share_tensors({"input_ids": torch.tensor([[1, 2, 3]])})
        start = time.perf_counter()
        connection.send(Submit(f"s{index}", refs, params, None, 30.0))
        got = 0
        while True:
            reply = connection.receive(WAIT_S)
            assert isinstance(reply, Tokens), reply
            if got == 0:
                shared.release()
            got += len(reply.token_ids)
            if reply.end:
                break
        per_token.append((time.perf_counter() - start) / got)
    return per_token


def queued(tokens: int, rounds: int) -> list[float]:
    per_token = []
    for _ in range(rounds):
        feed: queue.SimpleQueue[int | None] = queue.SimpleQueue()

        def produce(feed: queue.SimpleQueue[int | None] = feed) -> None:
            for token in range(tokens):
                feed.put(token)
            feed.put(None)

        start = time.perf_counter()
        thread = threading.Thread(target=produce)
        thread.start()
        got = 0
        while feed.get(timeout=WAIT_S) is not None:
            got += 1
        thread.join()
        per_token.append((time.perf_counter() - start) / got)
    return per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="round trips per size (16 MB: a quarter)")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per streamed answer")
    parser.add_argument("--streams", type=int, default=5, help="streamed answers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    with tempfile.TemporaryDirectory(prefix="gv-ipc-") as runtime:
        path = socket_path(Path(runtime) / "run", 0)
        engine = context.Process(target=echo, args=(str(path), ready, stop), daemon=True)
        engine.start()
        try:
            if not ready.wait(120):
                raise SystemExit("the echo engine did not start")
            with EngineConnection(path) as connection:
                round_trips(connection, inputs(1 << 20), 10)  # warm-up: sockets connected, pages touched
                print(f"cpu: {os.cpu_count()} cores; torch threads 1; p50 microseconds\n")
                title = "round trip, submit to first Tokens"
                print(f"{title:<44}{'ipc':>10}{'shm 1 proc':>12}{'copy only':>11}")
                sizes = (
                    ("0 MB", 0, args.rounds),
                    ("1 MB", 1 << 20, args.rounds),
                    ("16 MB", 16 << 20, args.rounds // 4),
                )
                for label, size, rounds in sizes:
                    tensors = inputs(size)
                    wire = round_trips(connection, tensors, rounds)
                    shm, copy = in_process(tensors, rounds)
                    name = f"  pixel_values {label} ({rounds} rounds)"
                    print(f"{name:<44}{p50_us(wire):>10.0f}{p50_us(shm):>12.0f}{p50_us(copy):>11.0f}")
                wire_tokens = streamed(connection, args.tokens, args.streams)
            local_tokens = queued(args.tokens, args.streams)
            print(f"\n{'per streamed token, one message each':<44}{'ipc':>10}{'queue 1 proc':>14}")
            name = f"  {args.tokens} tokens x {args.streams} answers"
            print(f"{name:<44}{p50_us(wire_tokens):>10.1f}{p50_us(local_tokens):>14.1f}")
        finally:
            stop.set()
            engine.join(WAIT_S)
            if engine.is_alive():
                engine.kill()


if __name__ == "__main__":
    main()
