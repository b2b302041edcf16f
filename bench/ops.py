#!/usr/bin/env python3
"""Operations' cost (issue 9): req/s with metrics and the request log on and off, and a cache hit's time.

`.venv/bin/python bench/ops.py [--clients 8] [--duration 10] [--rounds 3] [--hits 300]`
builds the demo model once, then:
- cost: for each round, each variant in turn (the order rotates between rounds) on a fresh server:
  `default` (metrics and request log on, as shipped), `no-metrics` (GLMVISION_METRICS=0),
  `no-log` (GLMVISION_REQUEST_LOG=0), `neither` (or those `--variants` names). Closed-loop clients,
  the bench's 1024x1024 JPEG, 16 greedy tokens, the response cache off (every request is the same).
  Medians over rounds, and each variant's req/s as a ratio of the last variant's, from this one run.
- cache: one server as shipped (cache on); one request (a miss), then `--hits` sequential copies
  of it (found by the image's bytes), then `--hits` with the same image's base64 broken into lines
  (other bytes, the same pixels: found by the pixel key, after decoding). Server-side milliseconds
  come from the request log's `total_ms`, client-side from the client's clock.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import requests
import run as load  # bench/run.py, beside this file: servers, clients, the image

VARIANTS = {
    "default": {},
    "no-metrics": {"GLMVISION_METRICS": "0"},
    "no-log": {"GLMVISION_REQUEST_LOG": "0"},
    "neither": {"GLMVISION_METRICS": "0", "GLMVISION_REQUEST_LOG": "0"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per variant and round")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hits", type=int, default=300, help="sequential cache hits timed")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "ops.json"))
    parser.add_argument("--only", choices=("cost", "cache"), help="run one part")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS)
    )
    return parser.parse_args(argv)


def server(
    name: str, extra: dict[str, str], port: int, model_dir: Path, image: str, args: argparse.Namespace
):
    """glmvision as bench/run.py starts it, plus `extra` settings."""
    options = argparse.Namespace(max_new_tokens=args.max_new_tokens, glmvision_env=extra, seed_threads=8)
    made = load.make_server("glmvision", port, model_dir, image, options)
    made.name = name
    return made


def cost(model_dir: Path, image: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """req/s per variant, each round on fresh servers in a rotated order."""
    names = [name.strip() for name in args.variants.split(",") if name.strip() in VARIANTS]
    runs: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            port = load.free_port()
            made = server(name, VARIANTS[name], port, model_dir, image, args)
            with load.running(made, port, work / f"{name}-{round_}.log", 240.0) as (base, _):
                result = load.run_level(
                    name, base + made.endpoint, made.body, args.clients, args.warmup, args.duration, 300.0
                )
            runs[name].append(result.req_per_s)
            print(f"round {round_ + 1} {name:>10}: {result.req_per_s:6.2f} req/s  ({result.errors} errors)")
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {"runs": runs, "median_req_per_s": medians}


def cache(model_dir: Path, image: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A miss, then `--hits` hits of the same request, timed on both sides."""
    port = load.free_port()
    made = server("cache", {"GLMVISION_CACHE": "1"}, port, model_dir, image, args)
    log_path = work / "cache.log"
    client_ms: list[float] = []
    with load.running(made, port, log_path, 240.0) as (base, _), requests.Session() as session:
        url = base + made.endpoint
        headers = {"Content-Type": "application/json"}
        first = session.post(url, data=made.body, headers={**headers, "X-Request-ID": "miss-0"}, timeout=300)
        assert first.headers.get("X-Cache") == "miss", first.headers
        for number in range(args.hits):
            started = time.perf_counter()
            answer = session.post(url, data=made.body, headers={**headers, "X-Request-ID": f"hit-{number}"})
            client_ms.append((time.perf_counter() - started) * 1000)
            assert answer.headers.get("X-Cache") == "hit", answer.headers
        # The same image with its base64 in 76-character lines: other bytes, the same pixels, so
        # the hit comes from the pixel key, after decoding.
        body = json.loads(made.body)
        body["image"] = "\n".join(image[i : i + 76] for i in range(0, len(image), 76))
        wrapped = json.dumps(body).encode()
        for number in range(args.hits):
            answer = session.post(url, data=wrapped, headers={**headers, "X-Request-ID": f"pixel-{number}"})
            assert answer.headers.get("X-Cache") == "hit", answer.headers
        time.sleep(0.5)  # the last line is written once its response is sent
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith('{"time"')]
    server_ms = [line["total_ms"] for line in lines if line["request_id"].startswith("hit-")]
    miss_ms = [line["total_ms"] for line in lines if line["request_id"] == "miss-0"]
    pixel_ms = [line["total_ms"] for line in lines if line["request_id"].startswith("pixel-")]
    return {
        "hits": len(server_ms),
        "server_p50_ms": load.percentile(server_ms, 0.5),
        "server_p95_ms": load.percentile(server_ms, 0.95),
        "pixel_p50_ms": load.percentile(pixel_ms, 0.5),
        "pixel_p95_ms": load.percentile(pixel_ms, 0.95),
        "client_p50_ms": load.percentile(client_ms, 0.5),
        "miss_ms": miss_ms[0] if miss_ms else None,
    }


def overhead(count: int = 20_000) -> dict[str, float]:
    """Microseconds per request that counting it in the metrics and writing its log line take."""
    from glmvision.ops.metrics import Metrics
    from glmvision.ops.record import ImageStat, RequestRecord
    from glmvision.ops.reqlog import request_logger

    metrics = Metrics()
    logger = request_logger()
    logger.handlers[0].stream = open(os.devnull, "w")  # the formatting is what is timed

    def record() -> RequestRecord:
        made = RequestRecord("3f1c" * 8, "POST", "/v1/chat/vision", "127.0.0.1", status=200)
        made.images = [ImageStat(1024, 1024, 1036, 1036)]
        made.prompt_tokens, made.visual_tokens, made.completion_tokens = 1400, 1369, 16
        made.queue_s, made.preprocess_s, made.generate_s, made.first_token_s = 0.003, 0.04, 0.2, 0.05
        made.finish_reason, made.key_id = "length", "9b2e61c0a1d4"
        return made

    records = [record() for _ in range(count)]
    started = time.perf_counter()
    for made in records:
        metrics.observe(made, 0.25)
    metrics_us = (time.perf_counter() - started) / count * 1e6
    started = time.perf_counter()
    for made in records:
        logger.info("request", extra={"pid": 1, **made.log_fields(0.25)})
    log_us = (time.perf_counter() - started) / count * 1e6
    return {"metrics_us": metrics_us, "log_us": log_us}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"versions": load.versions(), "args": vars(args), "overhead": overhead()}
    with tempfile.TemporaryDirectory(prefix="glmvision-ops-") as temp:
        work = Path(temp)
        model_dir = work / "model"
        load.build_model(model_dir)
        image = base64.b64encode(load.make_image()).decode()
        if args.only in (None, "cost"):
            results["cost"] = cost(model_dir, image, work, args)
        if args.only in (None, "cache"):
            results["cache"] = cache(model_dir, image, work, args)
    print()
    spent = results["overhead"]
    print(
        f"per request, in process: metrics {spent['metrics_us']:.1f} us, "
        f"request log line {spent['log_us']:.1f} us"
    )
    if "cost" in results:
        medians = results["cost"]["median_req_per_s"]
        last = list(medians)[-1]
        base = medians[last]
        print(f"{args.clients} clients, {args.duration:.0f} s x {args.rounds} rounds, medians:")
        print(f"| variant | median req/s | medians vs {last} | paired, per round |")
        print("| --- | --- | --- | --- |")
        runs = results["cost"]["runs"]
        for name, value in medians.items():
            # Each round ran every variant back to back: the geometric mean of those paired ratios
            # cancels the drift between rounds, which on a shared 2-core machine exceeds 10%.
            paired = statistics.geometric_mean([a / b for a, b in zip(runs[name], runs[last], strict=True)])
            print(f"| {name} | {value:.2f} | {value / base:.3f}x | {paired:.3f}x |")
    if "cache" in results:
        found = results["cache"]
        print(
            f"cache: {found['hits']} exact repeats, server-side p50 {found['server_p50_ms']:.2f} ms, "
            f"p95 {found['server_p95_ms']:.2f} ms (client-side p50 {found['client_p50_ms']:.2f} ms); "
            f"same pixels, other bytes: p50 {found['pixel_p50_ms']:.2f} ms, "
            f"p95 {found['pixel_p95_ms']:.2f} ms; "
            f"the miss took {found['miss_ms']} ms"
        )
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
