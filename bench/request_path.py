#!/usr/bin/env python3
"""What one request costs on the HTTP side, here against another checkout, in one run.

`.venv/bin/python bench/request_path.py --baseline DIR [--requests 300] [--rounds 5]`
runs this checkout and the one at DIR (e.g. `git worktree add /tmp/base <commit>`) in turn, A B A B,
each in a fresh interpreter with its own `glmvision` on sys.path, both on one demo model built once.
Each round times, through Flask's test client (no sockets, so only our code and Flask's is timed):
- `refused`: a body that fails validation (an unknown JSON field type): parsing, validation, the
  error registry and the error renderer, no model;
- `answered`: a one-token greedy answer on /v1/chat/vision with the response cache off.
It prints each kind's median microseconds per request per checkout, and the ratio this/baseline.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def worker(root: str, model: str, requests: int) -> None:
    """In a fresh interpreter: time `requests` of each kind against the checkout at `root`."""
    sys.path.insert(0, root)
    from PIL import Image

    from glmvision import create_app

    settings = {"GLMVISION_MODEL": model, "GLMVISION_DEVICE": "cpu", "GLMVISION_CACHE": "off"}
    app = create_app({**settings, "GLMVISION_REQUEST_LOG": "off"})
    client = app.test_client()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    answered = {"image": image, "prompt": "Colour?", "max_new_tokens": 1, "temperature": 0}
    refused = {"image": image, "prompt": "Colour?", "max_new_tokens": "many"}
    assert client.post("/v1/chat/vision", json=answered).status_code == 200  # loads the model
    timings: dict[str, float] = {}
    for kind, body, status in (("refused", refused, 400), ("answered", answered, 200)):
        started = time.perf_counter()
        for _ in range(requests):
            response = client.post("/v1/chat/vision", json=body)
            assert response.status_code == status, response.get_data(as_text=True)
        timings[kind] = (time.perf_counter() - started) / requests * 1e6
    print(json.dumps(timings), flush=True)
    # The model thread and the grammar compilers are still up: leave without tearing them down, which
    # can abort in their C++ destructors at interpreter exit.
    os._exit(0)


def run_one(root: Path, model: str, requests: int) -> dict[str, float]:
    """One checkout's round, in its own interpreter."""
    command = [sys.executable, __file__, "--worker", str(root), "--model", model, "--requests", str(requests)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, cwd=root)
    if result.returncode != 0:
        raise SystemExit(f"{root}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    """Alternate the two checkouts and print medians and ratios."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.requests)
        return 0
    if args.baseline is None:
        parser.error("--baseline DIR is required")
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        from glmvision.backends.local.demo import build_demo_model

        model = str(build_demo_model(Path(tmp) / "demo"))
        rows: dict[str, dict[str, list[float]]] = {"this": {}, "baseline": {}}
        for _ in range(args.rounds):
            for name, root in (("this", HERE), ("baseline", args.baseline.resolve())):
                for kind, value in run_one(root, model, args.requests).items():
                    rows[name].setdefault(kind, []).append(value)
    print(f"{'kind':10} {'baseline us':>12} {'this us':>10} {'this/baseline':>14}")
    for kind in rows["this"]:
        base, this = statistics.median(rows["baseline"][kind]), statistics.median(rows["this"][kind])
        print(f"{kind:10} {base:12.0f} {this:10.0f} {this / base:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
