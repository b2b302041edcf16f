#!/usr/bin/env python3
"""The upstream gateway's cost (issue 10): glmvision in front of an engine against the engine directly.

`.venv/bin/python bench/gateway.py [--clients 1,8] [--duration 10] [--rounds 3]`
builds the demo model once and starts two servers on free loopback ports: the engine (glmvision's
local backend) and a front (GLMVISION_BACKEND=openai pointed at the engine's /v1). Both get the
bench's request (1024x1024 JPEG, 16 greedy tokens) on POST /v1/chat/vision with closed-loop
clients; each round measures the engine directly, then through the front, per client count.
The response cache is off on both (every request is the same). Added p50 and the req/s ratio, from
this one run. Both servers share this machine's cores, so the front's own work slows the engine too:
the CPU milliseconds each server spent per request (all its processes, from /proc) say how much.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as load  # bench/run.py, beside this file: servers, clients, the image


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "gateway.json"))
    args = parser.parse_args(argv)
    args.client_list = [int(c) for c in args.clients.split(",") if c.strip()]
    return args


def cpu_seconds(group: int) -> float:
    """User + system CPU seconds of every live process in process group `group` (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == group:  # fields after the name: state, ppid, pgrp, ..., utime, stime
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"versions": load.versions(), "args": vars(args), "levels": {}}
    with tempfile.TemporaryDirectory(prefix="glmvision-gateway-") as temp:
        work = Path(temp)
        model_dir = work / "model"
        load.build_model(model_dir)
        image = base64.b64encode(load.make_image()).decode()
        options = argparse.Namespace(max_new_tokens=args.max_new_tokens, glmvision_env={}, seed_threads=8)
        engine_port, front_port = load.free_port(), load.free_port()
        engine = load.make_server("glmvision", engine_port, model_dir, image, options)
        options.glmvision_env = {
            "GLMVISION_BACKEND": "openai",
            "GLMVISION_UPSTREAM_URL": f"http://127.0.0.1:{engine_port}/v1",
        }
        front = load.make_server("glmvision", front_port, model_dir, image, options)
        front.name = "front"
        with (
            load.running(engine, engine_port, work / "engine.log", 240.0) as (engine_url, engine_group),
            load.running(front, front_port, work / "front.log", 240.0) as (front_url, front_group),
        ):
            for clients in args.client_list:
                runs: dict[str, list[tuple[float, float, float, float]]] = {"direct": [], "front": []}
                for round_ in range(args.rounds):
                    for name, base in (("direct", engine_url), ("front", front_url)):
                        url = base + engine.endpoint
                        before = cpu_seconds(engine_group), cpu_seconds(front_group)
                        level = load.run_level(
                            name, url, engine.body, clients, args.warmup, args.duration, 300.0
                        )
                        sent = max(1, level.warmup_requests + level.requests + level.late_requests)
                        engine_ms = (cpu_seconds(engine_group) - before[0]) * 1000 / sent
                        front_ms = (cpu_seconds(front_group) - before[1]) * 1000 / sent
                        rate, p50 = level.req_per_s, level.p50_ms
                        runs[name].append((rate, p50, engine_ms, front_ms))
                        where = f"{clients} clients, round {round_ + 1}, {name:>6}"
                        print(
                            f"{where}: {rate:6.2f} req/s, p50 {p50:.1f} ms, CPU per request: "
                            f"engine {engine_ms:.1f} ms, front {front_ms:.1f} ms"
                        )
                results["levels"][str(clients)] = runs
    print()
    print(
        "| clients | direct req/s | front req/s | ratio | direct p50 ms | front p50 ms | added p50 ms "
        "| engine CPU ms/req direct | engine CPU ms/req via front | front CPU ms/req |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for clients, runs in results["levels"].items():

        def median(name: str, column: int, runs: dict[str, Any] = runs) -> float:
            return statistics.median(run[column] for run in runs[name])

        direct_rps, front_rps = median("direct", 0), median("front", 0)
        direct_p50, front_p50 = median("direct", 1), median("front", 1)
        print(
            f"| {clients} | {direct_rps:.2f} | {front_rps:.2f} | {front_rps / direct_rps:.3f}x | "
            f"{direct_p50:.1f} | {front_p50:.1f} | {front_p50 - direct_p50:+.1f} | "
            f"{median('direct', 2):.1f} | {median('front', 2):.1f} | {median('front', 3):.1f} |"
        )
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
