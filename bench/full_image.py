#!/usr/bin/env python3
"""Full-image-budget load (issue 21): 2048 px photos at GLM-4.6V-Flash's real pixel limits, 1 vs 4 workers.

`.venv/bin/python bench/full_image.py [--seconds 20] [--clients 8] [--configs thread:1,process:1,process:4]`

Builds the demo model with `--full-image-budget` (the real processor limits: a 2048x1536 photo is
~4,000 visual tokens) in a temp dir, makes `--images` distinct 2048x1536 JPEGs up front (gradient +
seeded noise, a different one for every request while the pool lasts), then for each configuration
starts real gunicorn on a free port (CPU, response cache off), drives it with `--clients` closed-loop
clients (POST /v1/chat/vision, greedy, `--max-tokens` new tokens), and stops it: `thread` engine with
1 worker (the old baseline: the model in the worker), then `process` engine (one engine process
shared by the workers) with 1 and with 4 workers (`--configs`). Prints req/s, latency and the ratios
side by side. `--env KEY=VALUE` adds a setting to every server; `--logs DIR` keeps their logs.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as load

HERE = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 240.0
WIDTH, HEIGHT = 2048, 1536
PROMPT = "Describe this photo in one sentence."
# (engine mode, workers): the in-process baseline first, then the shared engine process.
CONFIGS = "thread:1,process:1,process:4"


def make_images(count: int, seed: int = 21) -> list[str]:
    """`count` distinct 2048x1536 JPEGs (base64): a colour gradient plus noise, shifted per image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    margin = 64
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = np.stack([x / WIDTH, y / HEIGHT, 1.0 - (x / WIDTH + y / HEIGHT) / 2], axis=-1) * 200.0
    # One noise field, cut at a different offset per image: every image differs in every pixel
    # without drawing 9 M random numbers each time.
    noise = rng.integers(0, 40, (HEIGHT + margin, WIDTH + margin, 3), dtype=np.uint8).astype(np.float32)
    images = []
    for _ in range(count):
        dy, dx = (int(v) for v in rng.integers(0, margin, 2))
        shift = rng.uniform(0.0, 15.0, 3).astype(np.float32)
        pixels = (base + shift + noise[dy : dy + HEIGHT, dx : dx + WIDTH]).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=85)
        images.append(base64.b64encode(out.getvalue()).decode("ascii"))
    return images


class ImagePool:
    """Hands out the pre-made request bodies in turn, across all configurations, counting reuses."""

    def __init__(self, images: list[str], max_tokens: int) -> None:
        self.bodies = [
            json.dumps(
                {"image": image, "prompt": PROMPT, "max_new_tokens": max_tokens, "temperature": 0}
            ).encode()
            for image in images
        ]
        self._next = itertools.count()
        self.handed = 0

    def take(self) -> bytes:
        """The next body (itertools.count is atomic under the GIL)."""
        index = next(self._next)
        self.handed = index + 1
        return self.bodies[index % len(self.bodies)]


@dataclass
class Result:
    """One configuration's measured window."""

    engine: str
    workers: int
    seconds: float
    ok: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    warmup: float = 0.0
    warmup_errors: int = 0

    @property
    def req_per_s(self) -> float:
        return self.ok / self.seconds


def post(session: requests.Session, url: str, body: bytes, timeout: float) -> tuple[bool, int, str]:
    """One request; (ok, prompt tokens, error text)."""
    try:
        response = session.post(
            url, data=body, headers={"Content-Type": "application/json"}, timeout=(5.0, timeout)
        )
    except requests.RequestException as error:
        return False, 0, type(error).__name__
    if response.status_code != 200:
        return False, 0, f"HTTP {response.status_code} {response.text[:120]}"
    try:
        return True, int(response.json()["usage"]["prompt_tokens"]), ""
    except (ValueError, KeyError, TypeError):
        return False, 0, "HTTP 200 without usage"


def drive(url: str, pool: ImagePool, result: Result, clients: int, warmup: float, pgid: int) -> None:
    """Closed loop: each client sends its next distinct image when its answer arrives.

    The window opens after `warmup` seconds and not before every client has had its first answer
    (with 8 clients on thousands of visual tokens each, the first round trip is long: counting it
    would measure the ramp). A request counts when it finishes inside the window; clients still
    waiting when it closes are abandoned (the server is stopped under them).
    """
    lock = threading.Lock()
    answered: set[int] = set()
    window = [float("inf"), float("inf")]  # opened, closed; clients read it on every answer

    def client(index: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < window[1]:
                start = time.monotonic()
                ok, prompt_tokens, error = post(session, url, pool.take(), timeout=300.0)
                end = time.monotonic()
                with lock:
                    if ok:
                        answered.add(index)
                    elif end < window[0]:
                        result.warmup_errors += 1
                    if window[0] <= end <= window[1]:
                        if ok:
                            result.ok += 1
                            result.latencies_ms.append((end - start) * 1000)
                            result.prompt_tokens.append(prompt_tokens)
                        else:
                            result.errors += 1
                            result.error_kinds[error] = result.error_kinds.get(error, 0) + 1
                if not ok:
                    time.sleep(load.ERROR_PAUSE_S)

    begin = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    while time.monotonic() < begin + warmup or len(answered) < clients:
        time.sleep(0.05)
    meter = load.CpuMeter(pgid)
    before = meter.snapshot()
    with lock:
        window[0] = time.monotonic()
        window[1] = window[0] + result.seconds
    result.warmup = window[0] - begin
    time.sleep(result.seconds)
    result.cpu = meter.shares(before, meter.snapshot())


def measure(
    engine: str, workers: int, model: Path, pool: ImagePool, args: argparse.Namespace, tmp: Path
) -> Result:
    """Start gunicorn in one configuration, load it, stop it."""
    port = load.free_port()
    runtime = tmp / f"run-{port}"
    runtime.mkdir(mode=0o700)
    # Every image differs anyway; the cache (off) is ruled out entirely.
    name = f"{engine} x{workers}"
    spec = load.glmvision_server(name, HERE, port, runtime, str(model), WORKERS=str(workers), ENGINE=engine)
    spec.env.update(item.split("=", 1) for item in args.env)
    log = tmp / f"gunicorn-{engine}-{workers}.log"
    result = Result(engine, workers, args.seconds)
    with load.running(spec, port, log, READY_TIMEOUT_S) as (url, pgid):
        drive(url + "/v1/chat/vision", pool, result, args.clients, args.warmup, pgid)
    print(
        f"  {name}: {result.ok} answers, {result.errors} errors in {args.seconds:.0f} s "
        f"(after {result.warmup:.0f} s warm-up with {result.warmup_errors} errors)",
        flush=True,
    )
    return result


def report(results: list[Result], args: argparse.Namespace, pool: ImagePool, notes: list[str]) -> None:
    """The side-by-side table, then the ratios."""
    base = results[0].req_per_s or float("nan")
    process_one = next((r.req_per_s for r in results if (r.engine, r.workers) == ("process", 1)), 0.0)
    process_one = process_one or float("nan")
    print()
    print(
        f"{args.clients} clients, distinct {WIDTH}x{HEIGHT} JPEGs, max_new_tokens {args.max_tokens}, "
        f"{args.seconds:.0f} s measured per configuration (after >= {args.warmup:.0f} s warm-up and every "
        "client's first answer)"
    )
    header = (
        f"{'engine':8} {'workers':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'ok':>4} {'err':>4} "
        f"{'prompt tok':>10} {'server/other CPU %':>19} {'vs thread x1':>13} {'vs process x1':>14}"
    )
    print(header)
    for r in results:
        ordered = r.latencies_ms
        tokens = f"{round(sum(r.prompt_tokens) / len(r.prompt_tokens))}" if r.prompt_tokens else "-"
        cpu = f"{r.cpu.get('server', 0):.0f}/{r.cpu.get('other', 0):.0f}" if r.cpu else "-"
        print(
            f"{r.engine:8} {r.workers:7d} {r.req_per_s:7.2f} {load.percentile(ordered, 0.5):8.0f} "
            f"{load.percentile(ordered, 0.95):8.0f} {r.ok:4d} {r.errors:4d} {tokens:>10} {cpu:>19} "
            f"{r.req_per_s / base:13.2f} {r.req_per_s / process_one:14.2f}"
        )
    for r in results:
        for kind, count in r.error_kinds.items():
            print(f"  {r.engine} x{r.workers} error x{count}: {kind}")
    reused = max(0, pool.handed - len(pool.bodies))
    if reused:
        print(f"  note: {reused} requests reused an image (pool {len(pool.bodies)}): raise --images")
    for note in notes:
        print(f"  {note}")


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per configuration")
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each window")
    parser.add_argument("--images", type=int, default=120, help="distinct images made up front")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_new_tokens of every request")
    parser.add_argument(
        "--configs",
        default=CONFIGS,
        help=f"ENGINE:WORKERS,... in order, the first is the baseline ({CONFIGS})",
    )
    parser.add_argument("--logs", type=Path, help="copy the servers' gunicorn logs into this directory")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for every server (repeatable), e.g. GLMVISION_TORCH_THREADS=2",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from glmvision.backends.local.demo import build_demo_model

    started = time.monotonic()
    notes = [
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {platform.node()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start",
    ]
    with tempfile.TemporaryDirectory(prefix="gv-fullimg-") as tmp_name:
        tmp = Path(tmp_name)
        model = build_demo_model(tmp / "demo", full_image_budget=True)
        pool = ImagePool(make_images(args.images), args.max_tokens)
        ready = time.monotonic() - started
        print(f"demo model (full image budget) and {args.images} images ready in {ready:.0f} s", flush=True)
        configs = [
            (engine, int(workers)) for engine, workers in (c.split(":") for c in args.configs.split(","))
        ]
        results = [measure(engine, workers, model, pool, args, tmp) for engine, workers in configs]
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("gunicorn-*.log"):
                shutil.copy(log, args.logs / log.name)
    whole = time.monotonic() - started
    notes.append(f"load average {os.getloadavg()[0]:.2f} at end; whole run {whole:.0f} s")
    report(results, args, pool, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
