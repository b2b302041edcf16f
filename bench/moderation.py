#!/usr/bin/env python3
"""What content moderation costs on the request path: chat completions with no moderation, with a local
OpenAI-style moderation service (GLMVISION_MODERATION_URL, a Flask app on loopback that passes all), and
with an in-process callable (GLMVISION_MODERATION), in one run.

Each configuration is an app on the demo model (Flask test client, the thread engine, response cache
off); the requests are taken in turn from each configuration so drift hits all alike. Prints the median
time per request, streamed and whole, the ratio to no moderation, and the moderation calls per request.
`.venv/bin/python bench/moderation.py [--requests 40] [--max-tokens 64]`
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from glmvision.backends.local.demo import build_demo_model
from glmvision.web.app import create_app

CALLS = {"n": 0}


def _passes(payload: Any) -> dict[str, Any]:
    """The in-process hook: one cheap rule, as in-house rules would be."""
    CALLS["n"] += 1
    text = payload if isinstance(payload, str) else ""
    return {"flagged": "forbidden" in text, "categories": {"house": "forbidden" in text}}


def _moderation_server() -> tuple[str, Callable[[], None]]:
    """A local moderation service that passes everything, on a free loopback port."""
    service = Flask("moderation")

    @service.post("/v1/moderations")
    def moderate() -> Any:
        return jsonify({"results": [_passes(request.get_json()["input"])]})

    server = make_server("127.0.0.1", 0, service, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.server_port}/v1/moderations", server.shutdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="per configuration and mode")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the moderation service's access log
    hooks = types.ModuleType("bench_hooks")
    hooks.passes = _passes  # type: ignore[attr-defined]
    sys.modules["bench_hooks"] = hooks
    url, stop = _moderation_server()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_demo_model(Path(tmp) / "demo")
        base = {"GLMVISION_MODEL": str(model), "GLMVISION_DEVICE": "cpu", "GLMVISION_CACHE": "0"}
        base["GLMVISION_REQUEST_LOG"] = "0"
        configs = {
            "none": {},
            "http": {"GLMVISION_MODERATION_URL": url},
            "callable": {"GLMVISION_MODERATION": "bench_hooks:passes"},
        }
        clients = {name: create_app({**base, **extra}).test_client() for name, extra in configs.items()}
        body = {
            "messages": [{"role": "user", "content": "Describe a red bicycle leaning on a wall."}],
            "max_tokens": args.max_tokens,
            "min_tokens": args.max_tokens,
        }
        for client in clients.values():  # load each model before timing
            client.post("/v1/chat/completions", json=body)
        times: dict[tuple[str, bool], list[float]] = {(n, s): [] for n in configs for s in (False, True)}
        calls: dict[tuple[str, bool], int] = dict.fromkeys(times, 0)
        for number in range(args.requests):
            for stream in (False, True):
                for name, client in clients.items():
                    sent = {**body, "stream": stream, "seed": number}
                    before = CALLS["n"]
                    started = time.perf_counter()
                    reply = client.post("/v1/chat/completions", json=sent)
                    reply.get_data()
                    times[(name, stream)].append(time.perf_counter() - started)
                    reply.close()
                    assert reply.status_code == 200, reply.get_data(as_text=True)
                    calls[(name, stream)] += CALLS["n"] - before
        stop()
    print(f"{args.requests} requests per cell, {args.max_tokens} tokens each, demo model on CPU")
    print(f"{'config':<10}{'mode':<8}{'median ms':>11}{'added ms':>10}{'ratio':>8}{'checks/req':>12}")
    for stream in (False, True):
        baseline = statistics.median(times[("none", stream)])
        for name in configs:
            median = statistics.median(times[(name, stream)])
            per = calls[(name, stream)] / args.requests
            mode = "stream" if stream else "whole"
            added = (median - baseline) * 1000
            ratio = median / baseline
            print(f"{name:<10}{mode:<8}{median * 1000:>11.1f}{added:>10.1f}{ratio:>8.3f}{per:>12.1f}")


if __name__ == "__main__":
    main()
