#!/usr/bin/env python3
"""Plain requests beside hostile schemas (issue 19): their p50 latency idle, and while clients keep
sending schemas that compile slowly or never in time.

For each checkout given (this one by default; add an older one to compare, e.g. one made with
`git worktree add /tmp/before <commit>`), starts real gunicorn (1 worker) on the demo model, times
small plain chat requests from one client for --duration seconds idle, then again while --clients
clients send hostile schemas, each one new (no cache helps): 24 properties of `^(a|b){500}$` (about
a second to compile, within modest schema limits), `^a{20000}$` (minutes), and arrays 801 deep.
Prints both p50s and their ratio per checkout, side by side.
`.venv/bin/python bench/hostile_schemas.py [--checkouts . /tmp/before] [--duration 20] [--clients 4]`
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
PLAIN = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
PLAIN_TIMEOUT = 60.0  # a plain request slower than this counts as this slow
HOSTILE_TIMEOUT = 120.0


def hostile_schema(family: int, number: int) -> dict[str, Any]:
    """The `number`th schema of a family: slow but valid, a huge repetition, or deep nesting."""
    if family == 0:
        names = [f"p{number}_{i}" for i in range(24)]
        return {
            "type": "object",
            "properties": {name: {"type": "string", "pattern": "^(a|b){500}$"} for name in names},
            "required": names,
        }
    if family == 1:
        return {"type": "string", "pattern": f"^a{{{20000 + number}}}$"}
    schema: dict[str, Any] = {"type": "integer", "maximum": number}
    for _ in range(801):
        schema = {"type": "array", "items": schema}
    return schema


def chat(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        **PLAIN,
        "response_format": {"type": "json_schema", "json_schema": {"name": "form", "schema": schema}},
    }


@dataclass
class Phase:
    """What one phase measured: plain latencies, and the hostile requests' outcomes."""

    plain: list[float] = field(default_factory=list)
    failed: int = 0
    hostile: collections.Counter[str] = field(default_factory=collections.Counter)
    hostile_seconds: list[float] = field(default_factory=list)

    def p50_ms(self) -> float:
        return statistics.median(self.plain) * 1000 if self.plain else float("nan")


@dataclass
class Result:
    checkout: str
    idle: Phase
    loaded: Phase
    restarts: int
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_pids(master: int) -> set[int]:
    result = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True)
    return {int(pid) for pid in result.stdout.split()}


def plain_client(url: str, until: float, phase: Phase) -> None:
    session = requests.Session()
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            ok = session.post(url, json=PLAIN, timeout=PLAIN_TIMEOUT).status_code == 200
        except requests.RequestException:
            ok = False
        phase.plain.append(time.monotonic() - started)
        phase.failed += not ok


def hostile_client(url: str, index: int, until: float, phase: Phase, lock: threading.Lock) -> None:
    session = requests.Session()
    number = index * 100_000
    while time.monotonic() < until:
        number += 1
        started = time.monotonic()
        try:
            response = session.post(
                url, json=chat(hostile_schema(number % 3, number)), timeout=HOSTILE_TIMEOUT
            )
            body = response.json() if response.status_code != 200 else {}
            outcome = f"{response.status_code} {body.get('error', {}).get('code', '')}".strip()
        except requests.RequestException as exc:
            outcome = type(exc).__name__
        with lock:
            phase.hostile[outcome] += 1
            phase.hostile_seconds.append(time.monotonic() - started)


def measure(url: str, seconds: float, clients: int) -> Phase:
    """One phase: one plain client for `seconds`, beside `clients` hostile ones."""
    phase, lock = Phase(), threading.Lock()
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=plain_client, args=(url, until, phase))]
    threads += [
        threading.Thread(target=hostile_client, args=(url, index, until, phase, lock), daemon=True)
        for index in range(clients)
    ]
    for thread in threads:
        thread.start()
    threads[0].join()  # the hostile ones may still wait on an answer: the server's stop ends them
    return phase


def bench_checkout(checkout: Path, model_dir: Path, args: argparse.Namespace, runtime: Path) -> Result:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(checkout),
        XDG_RUNTIME_DIR=str(runtime),
        GLMVISION_BIND=f"127.0.0.1:{port}",
        GLMVISION_MODEL=str(model_dir),
        GLMVISION_DEVICE="cpu",
        GLMVISION_WORKERS="1",
        GLMVISION_CACHE="0",  # every plain request reaches the model
    )
    log_path = runtime / f"gunicorn-{port}.log"
    command = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/chat/completions"
    label = checkout_label(checkout)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{label}: gunicorn not ready; log: {log_path}")
            time.sleep(0.25)
        # Warm: the first answers, and a first schema (which starts a compiler process, if any).
        for _ in range(3):
            requests.post(url, json=PLAIN, timeout=PLAIN_TIMEOUT)
        requests.post(
            url, json=chat({"type": "object", "properties": {"a": {"type": "integer"}}}), timeout=60
        )
        workers = worker_pids(server.pid)
        idle = measure(url, args.duration, 0)
        loaded = measure(url, args.duration, args.clients)
        after = worker_pids(server.pid)
        return Result(label, idle, loaded, len(workers - after), errors(log_path))
    finally:
        stop(server)
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(log_path, args.logs / f"{label.replace('/', '_')}.log")


def errors(log_path: Path, most: int = 40) -> list[str]:
    """The server log's errors and tracebacks, for a failure the table can only count."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = [i for i, line in enumerate(lines) if '"level": "ERROR"' in line or "Traceback" in line]
    return [lines[j] for i in keep[:3] for j in range(i, min(i + 12, len(lines)))][:most]


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM gunicorn's process group (workers and compilers), SIGKILL what is left."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=10)


def checkout_label(checkout: Path) -> str:
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True
    ).stdout.strip()
    return f"{checkout.name}@{head}" if head else str(checkout)


def report(results: list[Result], args: argparse.Namespace) -> None:
    print(
        f"\nplain p50 (1 client, {args.duration:g} s per phase): idle vs beside {args.clients} clients "
        "sending hostile schemas; 1 gunicorn worker, demo model on CPU"
    )
    header = f"{'checkout':28s} {'idle p50 ms':>12s} {'hostile p50 ms':>15s} {'ratio':>8s} {'plain n':>9s}"
    print(header + f" {'failed':>7s} {'restarts':>9s}  hostile answers (median s)")
    for result in results:
        idle, loaded = result.idle, result.loaded
        ratio = loaded.p50_ms() / idle.p50_ms()
        answers = ", ".join(f"{count}x {outcome}" for outcome, count in loaded.hostile.most_common())
        hostile_s = statistics.median(loaded.hostile_seconds) if loaded.hostile_seconds else float("nan")
        print(
            f"{result.checkout:28s} {idle.p50_ms():12.1f} {loaded.p50_ms():15.1f} {ratio:7.1f}x "
            f"{len(idle.plain):4d}/{len(loaded.plain):<4d} {loaded.failed:7d} {result.restarts:9d}  "
            f"{answers or 'none finished'} ({hostile_s:.1f})"
        )
    for result in results:
        for line in result.notes:
            print(f"  {result.checkout}: {line[:300]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkouts", nargs="+", type=Path, default=[ROOT])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=4, help="clients sending hostile schemas")
    parser.add_argument("--logs", type=Path, help="keep each server's log in this folder")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from glmvision.backends.local.demo import build_demo_model

    with tempfile.TemporaryDirectory(prefix="gv-hostile-") as tmp:
        model_dir = build_demo_model(Path(tmp) / "demo")
        results = []
        for checkout in args.checkouts:
            print(f"benchmarking {checkout_label(checkout.resolve())} ...", flush=True)
            results.append(bench_checkout(checkout.resolve(), model_dir, args, Path(tmp)))
        report(results, args)


if __name__ == "__main__":
    main()
