#!/usr/bin/env python3
"""Run the robustness drills longer than CI does and write docs/robustness.md with their figures.

    .venv/bin/python scripts/robustness.py            # ~3 minutes on 2 cores
    .venv/bin/python scripts/robustness.py --quick    # shorter, for a look

Every drill starts its own gunicorn (shipped defaults, one worker, the demo model on the CPU) on
a free loopback port. Run it on an otherwise idle machine: the clients share its cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from drills import fault, fault_hook_env, overload, soak  # noqa: E402
from helpers import live_server, server_env  # noqa: E402

from glmvision.backends.local.demo import build_demo_model  # noqa: E402


def _table(figures: dict[str, Any]) -> str:
    rows = ["| figure | value |", "| --- | --- |"]
    for name, value in figures.items():
        if isinstance(value, tuple):
            value = " / ".join(str(part) for part in value)
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        rows.append(f"| {name} | {value} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter drills")
    parser.add_argument("--out", default=str(ROOT / "docs" / "robustness.md"))
    args = parser.parse_args()
    seconds, soak_total = (10, 1200) if args.quick else (30, 4000)
    work = Path(tempfile.mkdtemp(prefix="gv-drills-"))
    demo = build_demo_model(work / "demo")
    sections = []
    for clients in (64, 200):
        run = work / f"overload-{clients}"
        run.mkdir()
        env = {k: v for k, v in server_env(demo, run).items() if k != "GLMVISION_WORKERS"}
        with live_server(run, env, ready_path="/readyz") as server:
            result = overload(server, clients=clients, seconds=seconds)
        print(f"overload {clients}:", result.figures(), flush=True)
        sections.append((f"Overload: {clients} clients for {seconds} s", result.figures()))
    run = work / "fault"
    run.mkdir()
    with live_server(run, {**server_env(demo, run), **fault_hook_env(run)}, ready_path="/readyz") as server:
        faulted = fault(server, run, requests_held=24)
    print("fault:", faulted.figures(), flush=True)
    sections.append(("A fault in the model thread, 24 requests held", faulted.figures()))
    run = work / "soak"
    run.mkdir()
    with live_server(run, server_env(demo, run), ready_path="/readyz") as server:
        soaked = soak(server, total=soak_total, clients=8, rounds=8)
    print("soak:", soaked.figures(), flush=True)
    sections.append((f"Soak: {soak_total} mixed good and bad requests, 8 clients", soaked.figures()))

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        "# Robustness drills",
        "",
        f"Written by `scripts/robustness.py{' --quick' if args.quick else ''}` on {when}: "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, shipped defaults, one gunicorn "
        "worker, the demo model on the CPU. "
        "Clients and probes run in processes of their own on the same machine. Clients wait as "
        "`Retry-After` says (times 0.5 to 1, at random) after a 503. CI runs shorter versions of the "
        "same drills (`tests/test_drills.py`), asserting outcomes, never timings.",
        "",
    ]
    for title, figures in sections:
        text += [f"## {title}", "", _table(figures), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(text), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
