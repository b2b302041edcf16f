#!/usr/bin/env python3
"""Overload and loading storms, GLMVISION_ENGINE=thread against process, in one run, side by side.

    .venv/bin/python bench/overload.py                 # ~4 minutes on 2 cores
    .venv/bin/python bench/overload.py --seconds 6     # shorter

For each engine mode, on real gunicorn (one HTTP worker, the demo model on the CPU, response cache
off so every answer is model work):
- load, quiet: from /healthz's first answer to /readyz's 200, nobody else asking;
- load, storm: from /healthz's first answer to the first 200 that clients retrying 50 ms after
  each 503 get;
- goodput: answers/s with 8 clients (the capacity), then 200 clients that honour Retry-After
  (polite) or retry 50 ms after a 503 (retrying), as a share of that capacity;
- /healthz p99 under the 200 clients.
Clients run in processes of their own; on a 2-core machine they share the cores with the server,
so the figures are for comparing the two modes in one run, not absolute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from drills import goodput, overload, percentile, storm  # noqa: E402
from helpers import live_server, server_env  # noqa: E402

from glmvision.backends.local.demo import build_demo_model  # noqa: E402


def _env(demo: Path, run: Path, engine: str) -> dict[str, str]:
    return server_env(demo, run, ENGINE=engine, CACHE="0")


def _quiet_load(demo: Path, work: Path, engine: str) -> float:
    run = Path(tempfile.mkdtemp(dir=work))
    with live_server(run, _env(demo, run, engine), ready_path="/healthz", timeout=180) as server:
        started = time.perf_counter()
        while requests.get(server.url + "/readyz", timeout=10).status_code != 200:
            time.sleep(0.02)
        return time.perf_counter() - started


def _storm_load(demo: Path, work: Path, engine: str, clients: int) -> float | None:
    run = Path(tempfile.mkdtemp(dir=work))
    with live_server(run, _env(demo, run, engine), ready_path="/healthz", timeout=180) as server:
        return storm(server.url, clients=clients, bound=120)


def _goodput(demo: Path, work: Path, engine: str, seconds: float, clients: int) -> dict[str, Any]:
    run = Path(tempfile.mkdtemp(dir=work))
    with live_server(run, _env(demo, run, engine), ready_path="/readyz", timeout=180) as server:
        capacity = goodput(overload(server, clients=8, seconds=seconds))
        polite = overload(server, clients=clients, seconds=seconds)
        retrying = overload(server, clients=clients, seconds=seconds, retry_pause=0.05)
    health = [latency for run in (polite, retrying) if run.health for latency in run.health.latencies]
    return {
        "capacity": capacity,
        "polite": goodput(polite) / capacity,
        "retrying": goodput(retrying) / capacity,
        "healthz_p99_ms": percentile(health, 0.99) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each goodput phase")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--engines", nargs="+", default=["thread", "process"], choices=["thread", "process"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gv-overload-"))
    demo = build_demo_model(work / "demo")
    figures: dict[str, dict[str, Any]] = {}
    for engine in args.engines:
        row = {
            "quiet": _quiet_load(demo, work, engine),
            "storm": _storm_load(demo, work, engine, args.clients),
        }
        row.update(_goodput(demo, work, engine, args.seconds, args.clients))
        figures[engine] = row
        print(engine, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    if len(figures) < 2:
        return 0
    thread, process = figures["thread"], figures["process"]
    lines = [
        ("load, quiet (s)", "quiet", "{:.1f}"),
        (f"load, storm of {args.clients}: first 200 (s)", "storm", "{:.1f}"),
        ("capacity, 8 clients (req/s)", "capacity", "{:.1f}"),
        (f"goodput, {args.clients} polite (x capacity)", "polite", "{:.2f}"),
        (f"goodput, {args.clients} retrying 50 ms (x capacity)", "retrying", "{:.2f}"),
        (f"/healthz p99 under {args.clients} (ms)", "healthz_p99_ms", "{:.1f}"),
    ]
    print("\n| figure | thread | process |\n| --- | --- | --- |")
    for label, key, fmt in lines:
        cells = [fmt.format(row[key]) if row[key] is not None else "none" for row in (thread, process)]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
