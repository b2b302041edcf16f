#!/usr/bin/env python3
"""What GLMVISION_ENGINE=process adds to a request's latency, against the in-process engine, in one run.

`.venv/bin/python bench/engine_latency.py [--baseline DIR] [--requests 60] [--tokens 16] [--long 64]`

Starts gunicorn servers on one demo model (CPU, 1 worker, response cache off): `thread` and `process`
engine modes of this checkout, and of the checkout at DIR too when given (e.g. `git worktree add
/tmp/base main`). One client sends POST /v1/chat/vision (a small image, greedy) to each server in turn,
round robin, so that the machine's load drifts alike for all. Prints p50/p90 ms for `--tokens` new
tokens, the per-streamed-token cost ((p50 at `--long` tokens - p50 at `--tokens`) / the difference),
and each process-mode p50 over its checkout's thread-mode p50. Then, per server: the tokens per second
of one stream of `--stream-tokens` (POST /v1/chat/completions, min_tokens = max_tokens, from its first
token to its last, median of 5), and req/s with `--clients` clients at once for `--seconds`.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as load

HERE = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 240.0


@contextmanager
def server(root: Path, model: str, engine: str, tmp: Path) -> Iterator[str]:
    """gunicorn with the checkout at `root`, one worker, the given engine mode; yields its URL."""
    port = load.free_port()
    runtime = tmp / f"run-{port}"
    runtime.mkdir(mode=0o700)
    spec = load.glmvision_server(
        f"{root.name} {engine}", root, port, runtime, model, WORKERS="1", ENGINE=engine
    )
    with load.running(spec, port, tmp / f"gunicorn-{port}.log", READY_TIMEOUT_S) as (url, _):
        yield url


def small_image() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--long", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from glmvision.backends.local.demo import build_demo_model

    roots = {"this": HERE}
    if args.baseline is not None:
        roots = {"baseline": args.baseline.resolve(), **roots}
    image = small_image()
    session = requests.Session()
    with tempfile.TemporaryDirectory(prefix="gv-latency-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        model = str(build_demo_model(tmp / "demo"))
        urls = {
            (name, engine): stack.enter_context(server(root, model, engine, tmp))
            for name, root in roots.items()
            for engine in ("thread", "process")
        }
        times: dict[tuple[str, str, int], list[float]] = {}
        counts = sorted({args.tokens, args.long})
        for index in range(args.warmup + args.requests):
            for tokens in counts:
                body = {"image": image, "prompt": "Colour?", "max_new_tokens": tokens, "temperature": 0}
                for key, url in urls.items():
                    started = time.perf_counter()
                    response = session.post(url + "/v1/chat/vision", json=body, timeout=60)
                    elapsed = (time.perf_counter() - started) * 1000
                    assert response.status_code == 200, response.text
                    made = response.json()["usage"]["completion_tokens"]
                    assert made == tokens, f"{key}: {made} tokens, not {tokens}"
                    if index >= args.warmup:
                        times.setdefault((*key, tokens), []).append(elapsed)
        streams = {key: stream_rate(url, image, args.stream_tokens) for key, url in urls.items()}
        rates = {
            key: concurrent_rate(url, image, args.tokens, args.clients, args.seconds)
            for key, url in urls.items()
        }
    print(f"{args.requests} sequential requests each, 1 client, {args.tokens} new tokens (p50/p90 ms)")
    print(f"{'checkout':9} {'engine':8} {'p50':>7} {'p90':>7} {'per token':>10} {'p50/thread':>11}")
    for name in roots:
        base = statistics.median(times[(name, "thread", args.tokens)])
        for engine in ("thread", "process"):
            short = times[(name, engine, args.tokens)]
            p50, p90 = statistics.median(short), statistics.quantiles(short, n=10)[-1]
            per_token = ""
            if args.long != args.tokens:
                long_p50 = statistics.median(times[(name, engine, args.long)])
                per_token = f"{(long_p50 - p50) / (args.long - args.tokens):.2f}"
            print(f"{name:9} {engine:8} {p50:7.1f} {p90:7.1f} {per_token:>10} {p50 / base:11.2f}")
    print(f"\none stream of {args.stream_tokens} tokens (tok/s), {args.clients} clients (req/s), /thread")
    for name in roots:
        for engine in ("thread", "process"):
            stream, rate = streams[(name, engine)], rates[(name, engine)]
            base_stream, base_rate = streams[(name, "thread")], rates[(name, "thread")]
            print(
                f"{name:9} {engine:8} {stream:8.1f} tok/s {stream / base_stream:5.2f}x"
                f" {rate:8.1f} req/s {rate / base_rate:5.2f}x"
            )
    return 0


def stream_rate(url: str, image: str, tokens: int, runs: int = 5) -> float:
    """Tokens per second of one streamed answer, first token to last (median of `runs`)."""
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
        {"type": "text", "text": "Describe it."},
    ]
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    rates = []
    for _ in range(runs):
        with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=120) as response:
            assert response.status_code == 200, response.text
            stamps = [time.perf_counter() for line in response.iter_lines() if line.startswith(b"data: {")]
        # The chunks carry about one token each (the first is the role, the last the finish reason).
        rates.append((tokens - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates)


def concurrent_rate(url: str, image: str, tokens: int, clients: int, seconds: float) -> float:
    """Answers per second with `clients` closed-loop clients for `seconds`."""
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.perf_counter() + seconds

    def client(number: int) -> int:
        done = 0
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                prompt = f"Colour {number}?"  # distinct prompts: no batch of identical rows
                body = {"image": image, "prompt": prompt, "max_new_tokens": tokens, "temperature": 0}
                response = session.post(url + "/v1/chat/vision", json=body, timeout=60)
                assert response.status_code == 200, response.text
                done += 1
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(client, range(clients)))
    return total / (time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit(main())
