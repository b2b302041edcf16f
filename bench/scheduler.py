#!/usr/bin/env python3
"""Scheduler benchmark (issue 8): glmvision's continuous and static schedulers beside the peers.

`.venv/bin/python bench/scheduler.py [--servers continuous,static,seed,hf,hf-cb] [--duration 12]`
builds the demo model once, then for each server: starts it on a free loopback port, runs every
scenario below against it with closed-loop clients, stops it. One table at the end, one run.

Scenarios (every request: the bench's 1024x1024 JPEG and prompt, `min_tokens` = `max_tokens`
so each answer is as long as asked, whatever the random model would say; `transformers serve`
refuses that field, so its answers may stop sooner, as the tokens/answer column shows):
- idle:   1 client, 8-token answers: the short request's latency with nothing else running;
- mixed:  3 clients asking for 1024-token answers plus 1 client with 8-token ones; the short
          client's p50 and max, against its idle p50;
- short8: 8 clients, 16-token answers, greedy;
- temps8: 8 clients, 16-token answers at temperatures 0, 0.4, 0.8 and 1.2 (two clients each);
- long8:  8 clients, 256-token answers: output tokens/s.

`continuous` and `static` run in the engine process (the default); `thread` is the continuous
scheduler with the model in the HTTP worker (GLMVISION_ENGINE=thread), for the two layouts side by side.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as load  # bench/run.py, beside this file: servers, clients, the image

SERVERS = ("continuous", "static", "thread", "seed", "hf", "hf-cb")


@dataclass
class Group:
    """Clients sending the same request."""

    name: str
    clients: int
    max_tokens: int
    temperature: float = 0.0


@dataclass
class Scenario:
    name: str
    groups: list[Group]


SCENARIOS = [
    Scenario("idle", [Group("short", 1, 8)]),
    Scenario("mixed", [Group("long", 3, 1024), Group("short", 1, 8)]),
    Scenario("short8", [Group("short", 8, 16)]),
    Scenario("temps8", [Group(f"t{t}", 2, 16, t) for t in (0.0, 0.4, 0.8, 1.2)]),
    Scenario("long8", [Group("long", 8, 256)]),
]


@dataclass
class GroupResult:
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)


def body_for(server: str, model: str, image_b64: str, group: Group) -> tuple[str, bytes]:
    """The endpoint and request body one group sends to one server."""
    if server == "seed":  # the naive wrapper only has the native endpoint
        payload: dict[str, Any] = {
            "image": image_b64,
            "prompt": load.PROMPT,
            "max_new_tokens": group.max_tokens,
            "min_new_tokens": group.max_tokens,
            "temperature": group.temperature,
        }
        return "/v1/chat/vision", json.dumps(payload).encode()
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + image_b64}},
        {"type": "text", "text": load.PROMPT},
    ]
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": group.max_tokens,
        "temperature": group.temperature,
    }
    if not server.startswith("hf"):  # transformers serve refuses the field (422)
        payload["min_tokens"] = group.max_tokens
    if group.temperature > 0:
        payload["top_p"] = 0.9
    return "/v1/chat/completions", json.dumps(payload).encode()


def drive(
    base: str,
    requests_by_group: dict[str, tuple[int, str, bytes]],
    warmup: float,
    duration: float,
    timeout: float,
) -> dict[str, GroupResult]:
    """Closed-loop clients for every group at once; count answers that end inside the measured window."""
    window = [math.inf, math.inf]  # start, end: set once the warm-up is over
    results = {name: GroupResult() for name in requests_by_group}
    lock = threading.Lock()

    def client(name: str, endpoint: str, body: bytes) -> None:
        with load.requests.Session() as session:
            while (start := time.monotonic()) < window[1]:
                ok, tokens, error = load.post_once(session, base + endpoint, body, timeout)
                end = time.monotonic()
                if window[0] <= end < window[1]:
                    with lock:
                        result = results[name]
                        result.requests += ok
                        result.errors += not ok
                        result.tokens += tokens
                        if ok:
                            result.latencies_ms.append((end - start) * 1000)
                        else:
                            kind = load._error_kind(error)
                            result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1
                if not ok:
                    time.sleep(load.ERROR_PAUSE_S)

    threads = [
        threading.Thread(target=client, args=(name, endpoint, body), daemon=True)
        for name, (count, endpoint, body) in requests_by_group.items()
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    time.sleep(warmup)
    window[0] = time.monotonic()
    window[1] = window[0] + duration
    for thread in threads:
        thread.join(timeout=duration + timeout + 10)
    return results


def server_for(name: str, port: int, model_dir: Path, image_b64: str) -> load.Server:
    args = argparse.Namespace(glmvision_env={}, max_new_tokens=16, seed_threads=8)
    if name in ("continuous", "static", "thread"):
        server = load.make_server("glmvision", port, model_dir, image_b64, args)
        # thread: the continuous scheduler with the model in the HTTP worker, not the engine process.
        server.env["GLMVISION_SCHEDULER"] = "continuous" if name == "thread" else name
        server.env["GLMVISION_ENGINE"] = "thread" if name == "thread" else "process"
        server.name = name
        return server
    return load.make_server(name, port, model_dir, image_b64, args)


def bench_server(name: str, model_dir: Path, image_b64: str, workdir: Path, args: argparse.Namespace) -> dict:
    port = load.free_port()
    server = server_for(name, port, model_dir, image_b64)
    model = str(model_dir) if name.startswith("hf") else "glm-4.6v-flash-demo"
    found: dict[str, Any] = {}
    print(f"\n== {name}", flush=True)
    with load.running(server, port, workdir / f"{name}.log", args.startup_timeout) as (base, _):
        for scenario in SCENARIOS:
            if scenario.name not in args.scenario_list:
                continue
            groups = {g.name: (g.clients, *body_for(name, model, image_b64, g)) for g in scenario.groups}
            duration = args.duration * (2 if scenario.name == "mixed" else 1)
            results = drive(base, groups, args.warmup, duration, args.request_timeout)
            found[scenario.name] = {"duration_s": duration, **{k: vars(v) for k, v in results.items()}}
            print(
                f"  {scenario.name}: " + "; ".join(_summary(k, v, duration) for k, v in results.items()),
                flush=True,
            )
    return found


def _summary(name: str, result: GroupResult, duration: float) -> str:
    p50 = load.percentile(result.latencies_ms, 0.5)
    line = f"{name} {result.requests / duration:.1f} req/s p50 {p50:.0f} ms errors {result.errors}"
    if result.error_kinds:
        line += f" (first: {next(iter(result.error_kinds))})"
    return line


def _all(found: dict[str, Any], scenario: str) -> GroupResult:
    """Every group of a scenario added together."""
    total = GroupResult()
    for key, value in found.get(scenario, {}).items():
        if key != "duration_s":
            total.requests += value["requests"]
            total.errors += value["errors"]
            total.tokens += value["tokens"]
            total.latencies_ms += value["latencies_ms"]
    return total


def table(found: dict[str, dict[str, Any]]) -> list[str]:
    """One row per server: the figures the issue asks for, side by side."""
    header = (
        "| server | idle short p50 ms | mixed: short p50 ms | short max ms | x idle | long tok/s "
        "| short8 req/s | tokens/answer | temps8 req/s | long8 tok/s | errors |"
    )
    lines = [header, "|" + "---|" * 11]
    for name, scenarios in found.items():
        idle = scenarios.get("idle", {}).get("short", {}).get("latencies_ms", [])
        mixed = scenarios.get("mixed", {})
        short = mixed.get("short", {}).get("latencies_ms", [])
        idle_p50, short_p50 = load.percentile(idle, 0.5), load.percentile(short, 0.5)
        long_tps = mixed.get("long", {}).get("tokens", 0) / mixed.get("duration_s", 1)
        per_s = {s: _all(scenarios, s) for s in ("short8", "temps8", "long8")}
        seconds = {s: scenarios.get(s, {}).get("duration_s", 1) for s in per_s}
        errors = sum(_all(scenarios, s.name).errors for s in SCENARIOS)
        lines.append(
            f"| {name} | {idle_p50:.0f} | {short_p50:.0f} | {max(short, default=math.nan):.0f} "
            f"| {short_p50 / idle_p50:.1f} | {long_tps:.0f} "
            f"| {per_s['short8'].requests / seconds['short8']:.1f} "
            f"| {per_s['short8'].tokens / max(per_s['short8'].requests, 1):.1f} "
            f"| {per_s['temps8'].requests / seconds['temps8']:.1f} "
            f"| {per_s['long8'].tokens / seconds['long8']:.0f} | {errors} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: " + ",".join(SERVERS))
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS))
    parser.add_argument("--duration", type=float, default=12.0, help="measured seconds (mixed: twice that)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--startup-timeout", type=float, default=240.0)
    parser.add_argument("--out", default=str(load.BENCH / "scheduler.json"), help="raw results as JSON")
    args = parser.parse_args(argv)
    args.scenario_list = args.scenarios.split(",")
    names = args.servers.split(",")
    missing = load.missing_modules(["hf" if n.startswith("hf") else "glmvision" for n in names])
    if missing:
        print(
            f"missing {', '.join(missing)}: .venv/bin/pip install -r requirements-bench.txt", file=sys.stderr
        )
        return 2
    signal.signal(signal.SIGTERM, load._raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="glmvision-sched-"))
    print(f"temp dir: {workdir}", flush=True)
    load.build_model(workdir / "demo-model")
    image_b64 = base64.b64encode(load.make_image()).decode()
    found = {name: bench_server(name, workdir / "demo-model", image_b64, workdir, args) for name in names}
    print()
    print("\n".join(table(found)))
    Path(args.out).write_text(json.dumps({"versions": load.versions(), "results": found}, indent=1))
    print(f"\nraw results: {args.out}")
    return 1 if any(_all(s, sc.name).errors for s in found.values() for sc in SCENARIOS) else 0


if __name__ == "__main__":
    sys.exit(main())
