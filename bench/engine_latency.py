#!/usr/bin/env python3
"""What GLMVISION_ENGINE=process adds to a request's latency, against the in-process engine, in one run.

`.venv/bin/python bench/engine_latency.py [--baseline DIR] [--requests 60] [--tokens 16] [--long 64]`

Starts gunicorn servers on one demo model (CPU, 1 worker, response cache off): `thread` and `process`
engine modes of this checkout, and of the checkout at DIR too when given (e.g. `git worktree add
/tmp/base main`). One client sends POST /v1/chat/vision (a small image, greedy) to each server in turn,
round robin, so that the machine's load drifts alike for all. Prints p50/p90 ms for `--tokens` new
tokens, the per-streamed-token cost ((p50 at `--long` tokens - p50 at `--tokens`) / the difference),
and each process-mode p50 over its checkout's thread-mode p50.
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
    env = load.base_env()
    env.update(
        {
            "GLMVISION_BIND": f"127.0.0.1:{port}",
            "GLMVISION_MODEL": model,
            "GLMVISION_DEVICE": "cpu",
            "GLMVISION_WORKERS": "1",
            "GLMVISION_ENGINE": engine,
            "GLMVISION_CACHE": "off",
            "GLMVISION_REQUEST_LOG": "off",
            "TRANSFORMERS_OFFLINE": "1",
            "XDG_RUNTIME_DIR": str(runtime),
            "PYTHONPATH": str(root),
        }
    )
    command = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"]
    spec = load.Server(f"{root.name} {engine}", command, env, "/readyz", "/v1/chat/vision", b"", cwd=root)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
