#!/usr/bin/env python3
"""What per-key accounting and quotas cost on the request path, against none, in one run.

`.venv/bin/python bench/accounting.py [--requests 200] [--rounds 5] [--redis redis://127.0.0.1:6379/0]`
builds the demo model once and two apps on it, in this interpreter:
- `none`: one plain key (GLMVISION_API_KEYS): authentication only, nothing counted;
- `accounting`: the same key named in a TOML keys file with requests_per_minute, tokens_per_day and
  images_per_day (all too high to refuse), so every request is counted, held and settled; its
  counters in this process (memory://), or in Redis with --redis.
Each round times `requests` one-token greedy answers with one small image on /v1/chat/completions
through Flask's test client (no sockets), the apps in turn (A B A B). It prints the median
microseconds per request of each and the ratio accounting/none.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

KEY = "sk-bench-accounting"


def body() -> dict[str, Any]:
    """A one-image, one-token greedy chat completion."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Colour?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0}


def timed(client: Any, payload: dict[str, Any], requests: int) -> float:
    """Microseconds per request over `requests` answers."""
    headers = {"Authorization": f"Bearer {KEY}"}
    started = time.perf_counter()
    for _ in range(requests):
        response = client.post("/v1/chat/completions", json=payload, headers=headers)
        assert response.status_code == 200, response.get_json()
    return (time.perf_counter() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", metavar="URI", default="", help="count in this Redis (default: memory://)")
    args = parser.parse_args()

    from glmvision import create_app
    from glmvision.backends.local.demo import build_demo_model

    work = Path(tempfile.mkdtemp(prefix="bench-accounting-"))
    model = str(build_demo_model(work / "model"))
    keys = work / "keys.toml"
    big = 10**12
    keys.write_text(
        f'[keys.bench]\nkey = "{KEY}"\nrequests_per_minute = {big}\ntokens_per_day = {big}\n'
        f"images_per_day = {big}\n"
    )
    common = {
        "GLMVISION_MODEL": model,
        "GLMVISION_DEVICE": "cpu",
        "GLMVISION_CACHE": "off",
        "GLMVISION_REQUEST_LOG": "off",
    }
    apps = {
        "none": create_app({**common, "GLMVISION_API_KEYS": KEY}),
        "accounting": create_app(
            {
                **common,
                "GLMVISION_API_KEYS_FILE": str(keys),
                "GLMVISION_USAGE_STORAGE_URI": args.redis or "memory://",
            }
        ),
    }
    payload = body()
    clients = {name: app.test_client() for name, app in apps.items()}
    for client in clients.values():  # warm both: the first answers load and compile
        timed(client, payload, 10)
    results: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(args.rounds):
        for name, client in clients.items():
            results[name].append(timed(client, payload, args.requests))
    medians = {name: statistics.median(values) for name, values in results.items()}
    storage = args.redis or "memory://"
    print(f"{args.rounds} rounds x {args.requests} requests, usage storage {storage}")
    for name, value in medians.items():
        print(f"  {name:<11} {value:9.0f} us/request (median of rounds)")
    print(f"  ratio accounting/none: {medians['accounting'] / medians['none']:.3f}")


if __name__ == "__main__":
    main()
