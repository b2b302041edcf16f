#!/usr/bin/env python3
"""Load benchmark (issue 4): glmvision as deployed vs a naive seed wrapper vs `transformers serve`.

`.venv/bin/python bench/run.py [--servers glmvision,seed,hf,hf-cb] [--clients 1,4,8,16] [--duration 10]`
(or `bench/run.py ...` with .venv activated) builds the demo model once, starts each server on a free
loopback port, drives it with closed-loop clients, stops it, times model.generate() alone, prints a
table and writes the raw results as JSON.
"""

from __future__ import annotations

import argparse
import base64
import collections
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    import requests
except ImportError:  # launched by a Python without the bench's requirements (e.g. the system's python3)
    raise SystemExit(
        "bench/run.py needs the repository's .venv: .venv/bin/pip install -r requirements-bench.txt, "
        "then .venv/bin/python bench/run.py ..."
    ) from None

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
SERVERS = ("glmvision", "seed", "hf", "hf-cb")
PROMPT = "Describe this image in one sentence."
IMAGE_SIDE = 1024
ERROR_PAUSE_S = 0.1  # a client that got an error waits this long, so a failing server is not spun on
MAX_ERROR_KINDS = 20


# ----- the request image -----


def make_image(side: int = IMAGE_SIDE, seed: int = 4) -> bytes:
    """A deterministic, photo-like landscape JPEG (gradients, shapes, texture, noise), not flat colour."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    horizon = 0.55
    sky = np.stack([0.35 + 0.45 * y, 0.55 + 0.35 * y, 0.95 - 0.1 * y], axis=-1)
    sun = np.exp(-(((x - 0.72) ** 2 + (y - 0.2) ** 2) / 0.004))[..., None] * np.array([1.0, 0.85, 0.5])
    ridge = horizon - 0.12 - 0.06 * np.sin(x * 9.0 + 1.3) - 0.04 * np.sin(x * 23.0) - 0.02 * np.sin(x * 61.0)
    mountain = (y > ridge)[..., None] * np.array([-0.25, -0.3, -0.35])
    ground = (y > horizon)[..., None]
    grass = np.stack([0.25 + 0.2 * y, 0.45 + 0.15 * np.sin(x * 40.0) * 0.3, 0.15 + 0.05 * y], axis=-1)
    picture = np.where(ground, grass, np.clip(sky + sun + mountain, 0.0, 1.0))
    picture = picture + rng.normal(0.0, 0.035, picture.shape)
    image = Image.fromarray((np.clip(picture, 0.0, 1.0) * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(14):  # trees
        cx, base = int(rng.uniform(0.02, 0.98) * side), int(rng.uniform(horizon + 0.05, 0.98) * side)
        height = int(rng.uniform(0.08, 0.2) * side)
        green = (int(rng.uniform(20, 60)), int(rng.uniform(80, 140)), int(rng.uniform(20, 60)))
        draw.rectangle([cx - side // 160, base - height // 5, cx + side // 160, base], fill=(90, 60, 30))
        draw.polygon(
            [
                (cx - height // 3, base - height // 5),
                (cx + height // 3, base - height // 5),
                (cx, base - height),
            ],
            fill=green,
        )
    left, top = int(0.18 * side), int(0.6 * side)  # a house
    draw.rectangle([left, top, left + side // 5, top + side // 7], fill=(200, 190, 170), outline=(60, 40, 30))
    draw.polygon(
        [
            (left - side // 40, top),
            (left + side // 5 + side // 40, top),
            (left + side // 10, top - side // 10),
        ],
        fill=(150, 40, 35),
    )
    draw.rectangle(
        [left + side // 13, top + side // 20, left + side // 8, top + side // 7], fill=(80, 50, 30)
    )
    draw.text((int(0.05 * side), int(0.05 * side)), "glmvision bench", fill=(255, 255, 255))
    image = image.filter(ImageFilter.GaussianBlur(0.8))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


# ----- servers -----


@dataclass
class Server:
    """How to start one server and talk to it."""

    name: str
    command: list[str]
    env: dict[str, str]
    ready_path: str
    endpoint: str
    body: bytes
    cwd: Path = REPO
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (released again for the server to take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env() -> dict[str, str]:
    """The bench's environment without GLMVISION_* settings, offline for the hub, unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def glmvision_server(name: str, root: Path, port: int, runtime: Path, model: str, **settings: str) -> Server:
    """glmvision under gunicorn from the checkout at `root`, on the CPU, response cache and request log
    off, plus GLMVISION_<NAME> `settings`; `runtime` must exist (0700)."""
    env = base_env()
    env.update(
        {
            "GLMVISION_BIND": f"127.0.0.1:{port}",
            "GLMVISION_MODEL": model,
            "GLMVISION_DEVICE": "cpu",
            "GLMVISION_CACHE": "off",
            "GLMVISION_REQUEST_LOG": "off",
            "TRANSFORMERS_OFFLINE": "1",
            "XDG_RUNTIME_DIR": str(runtime),
            "PYTHONPATH": str(root),
            **{f"GLMVISION_{key}": value for key, value in settings.items()},
        }
    )
    command = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"]
    return Server(name, command, env, "/readyz", "/v1/chat/vision", b"", cwd=root)


def vision_body(image_b64: str, max_new_tokens: int) -> bytes:
    """The /v1/chat/vision request shared by glmvision and the seed app."""
    body = {"image": image_b64, "prompt": PROMPT, "max_new_tokens": max_new_tokens, "temperature": 0}
    return json.dumps(body).encode()


def completions_body(image_b64: str, max_new_tokens: int, model: str) -> bytes:
    """The OpenAI chat completion request for `transformers serve`: an image_url data URL part."""
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + image_b64}},
        {"type": "text", "text": PROMPT},
    ]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_new_tokens,
        "temperature": 0,
    }
    return json.dumps(body).encode()


def transformers_cli() -> str:
    """The `transformers` console script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "transformers"
    if beside.exists():
        return str(beside)
    found = shutil.which("transformers")
    if found is None:
        raise RuntimeError("no `transformers` command (.venv/bin/pip install -r requirements-bench.txt)")
    return found


def make_server(name: str, port: int, model_dir: Path, image_b64: str, args: argparse.Namespace) -> Server:
    """The start command, environment and request of one named server."""
    env = base_env()
    if name == "glmvision":
        env.update(GLMVISION_MODEL=str(model_dir), GLMVISION_DEVICE="cpu", GLMVISION_BIND=f"127.0.0.1:{port}")
        # Every request is the same greedy one: with the response cache on, glmvision would answer
        # from memory while the peers run the model. The bench measures serving the model.
        env["GLMVISION_CACHE"] = "0"
        env.update(args.glmvision_env)
        command = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"]
        body = vision_body(image_b64, args.max_new_tokens)
        return Server(name, command, env, "/readyz", "/v1/chat/vision", body)
    if name == "seed":
        env["SEED_MODEL_DIR"] = str(model_dir)
        command = [
            sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
            "--worker-class", "gthread", "--threads", str(args.seed_threads), "--timeout", "300",
            "--chdir", str(BENCH), "seed_app:app",
        ]  # fmt: skip
        body = vision_body(image_b64, args.max_new_tokens)
        return Server(name, command, env, "/healthz", "/v1/chat/vision", body)
    if name in ("hf", "hf-cb"):
        command = [
            transformers_cli(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--device", "cpu",
        ]  # fmt: skip
        command.append("--continuous-batching" if name == "hf-cb" else "--no-continuous-batching")
        body = completions_body(image_b64, args.max_new_tokens, str(model_dir))
        return Server(name, command, env, "/health", "/v1/chat/completions", body)
    raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")


class ServerFailed(RuntimeError):
    """A server did not come up (or died); the message names its log."""


@contextmanager
def running(server: Server, port: int, log_path: Path, startup_timeout: float) -> Iterator[tuple[str, int]]:
    """Start the server, wait until it answers, yield its base URL and process group, always stop it."""
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            server.command,
            cwd=server.cwd,
            env=server.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: gunicorn workers stop with it
        )
        try:
            started = time.monotonic()
            deadline = started + startup_timeout
            while True:
                if process.poll() is not None:
                    raise ServerFailed(
                        f"{server.name} exited with {process.returncode} while starting; log: {log_path}"
                    )
                try:
                    if requests.get(base + server.ready_path, timeout=2.0).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise ServerFailed(
                        f"{server.name} not ready after {startup_timeout:.0f} s; log: {log_path}"
                    )
                time.sleep(0.25)
            server.notes.append(f"ready after {time.monotonic() - started:.1f} s")
            yield base, process.pid
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it has not exited within grace."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # leftovers of the group (workers), if any
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(timeout=5.0)


# ----- load -----


class CpuMeter:
    """CPU seconds of the machine, the server's process tree and this bench, between two snapshots.

    The tree, not the process group: glmvision's engine process runs in a session of its own (so that a
    signal to the server's group does not reach it first), and a group count would miss its CPU."""

    def __init__(self, server_pgid: int) -> None:
        self.server_pgid = server_pgid
        self.cpus = os.cpu_count() or 1

    def snapshot(self) -> tuple[float, float, float, float] | None:
        """(wall, machine busy, server tree, bench) seconds now; None without psutil."""
        try:
            import psutil
        except ImportError:
            return None
        machine = psutil.cpu_times()
        busy = sum(getattr(machine, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
        server = 0.0
        try:
            root = psutil.Process(self.server_pgid)  # the server leads its group: its pid is the pgid
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for process in tree:
            try:
                times = process.cpu_times()
                server += times.user + times.system + times.children_user + times.children_system
            except psutil.Error:
                continue
        own = psutil.Process().cpu_times()
        return time.monotonic(), busy, server, own.user + own.system

    def shares(
        self,
        before: tuple[float, float, float, float] | None,
        after: tuple[float, float, float, float] | None,
    ) -> dict[str, float]:
        """Server, bench and everything else as % of the machine's capacity over the span."""
        if before is None or after is None:
            return {}
        capacity = (after[0] - before[0]) * self.cpus
        busy, server, own = (after[i] - before[i] for i in (1, 2, 3))
        return {
            "server": 100.0 * server / capacity,
            "bench": 100.0 * own / capacity,
            "other": 100.0 * max(0.0, busy - server - own) / capacity,
        }


@dataclass
class Sample:
    """One request as a client saw it."""

    start: float
    end: float
    ok: bool
    tokens: int = 0
    error: str = ""


def post_once(session: requests.Session, url: str, body: bytes, timeout: float) -> tuple[bool, int, str]:
    """Send one request; (ok, completion tokens, error text)."""
    try:
        response = session.post(
            url, data=body, headers={"Content-Type": "application/json"}, timeout=(5.0, timeout)
        )
    except requests.RequestException as error:
        return False, 0, f"{type(error).__name__}: {error}"[:300]
    if response.status_code != 200:
        return False, 0, f"HTTP {response.status_code}: {response.text[:300]}"
    try:
        payload = response.json()
        tokens = int(payload["usage"]["completion_tokens"])
    except (ValueError, KeyError, TypeError):
        return False, 0, f"HTTP 200 without usage: {response.text[:300]}"
    return True, tokens, ""


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile of values (nan when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class LevelResult:
    """One server at one concurrency."""

    server: str
    clients: int
    duration_s: float
    requests: int
    errors: int
    req_per_s: float
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_tokens: float
    warmup_requests: int
    late_requests: int
    error_kinds: dict[str, int]
    warmup_s: float = 0.0  # the warm-up this level took: --warmup, or longer until every client had an answer
    cpu_pct: dict[str, float] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # counted requests, in order of completion


def run_level(
    name: str,
    url: str,
    body: bytes,
    clients: int,
    warmup: float,
    duration: float,
    timeout: float,
    meter: CpuMeter | None = None,
) -> LevelResult:
    """Closed loop: each client sends its next request when the previous answer arrives.

    The measured window opens after `warmup` seconds, and not before every client has had its first
    answer (or `timeout` more seconds passed): with many clients or long answers the first round
    trip takes longer than the warm-up, and a window opened during it would count the ramp (the
    first answers, which queued behind fewer others) instead of the steady state.
    """
    cpu_before = meter.snapshot() if meter else None
    samples: list[Sample] = []
    answered: set[int] = set()
    lock = threading.Lock()
    begin = time.monotonic() + 0.2
    window_end = math.inf  # clients read it on every loop; set once the warm-up is over

    def client(index: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < begin:
                time.sleep(0.01)
            while (start := time.monotonic()) < window_end:
                ok, tokens, error = post_once(session, url, body, timeout)
                sample = Sample(start, time.monotonic(), ok, tokens, error)
                with lock:
                    samples.append(sample)
                    answered.add(index)
                if not ok:
                    time.sleep(ERROR_PAUSE_S)

    threads = [
        threading.Thread(target=client, args=(i,), daemon=True, name=f"client-{i}") for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    warm_until, give_up = begin + warmup, begin + warmup + timeout + 5.0
    while True:
        now = time.monotonic()
        with lock:
            everyone = len(answered) == clients
        if now >= warm_until and (everyone or now >= give_up):
            break
        time.sleep(0.05)
    window_start = now
    window_end = window_start + duration
    join_deadline = window_end + timeout + 10.0
    for thread in threads:
        thread.join(timeout=max(0.0, join_deadline - time.monotonic()))
    cpu = meter.shares(cpu_before, meter.snapshot()) if meter else {}
    with lock:
        taken = list(samples)
    counted = [s for s in taken if window_start <= s.end < window_end]
    good = sorted((s for s in counted if s.ok), key=lambda s: s.end)
    bad = [s for s in counted if not s.ok]
    kinds = collections.Counter(_error_kind(s.error) for s in bad)
    latencies = [(s.end - s.start) * 1000.0 for s in good]
    tokens = sum(s.tokens for s in good)
    return LevelResult(
        server=name,
        clients=clients,
        duration_s=duration,
        requests=len(good),
        errors=len(bad) + sum(thread.is_alive() for thread in threads),
        req_per_s=len(good) / duration,
        tokens_per_s=tokens / duration,
        p50_ms=percentile(latencies, 0.50),
        p95_ms=percentile(latencies, 0.95),
        p99_ms=percentile(latencies, 0.99),
        mean_tokens=tokens / len(good) if good else math.nan,
        warmup_requests=sum(1 for s in taken if s.end < window_start),
        warmup_s=round(window_start - begin, 2),
        late_requests=sum(1 for s in taken if s.end >= window_end),
        error_kinds=dict(kinds.most_common(MAX_ERROR_KINDS)),
        cpu_pct=cpu,
        latencies_ms=[round(v, 1) for v in latencies],
    )


def _error_kind(error: str) -> str:
    """An error message with ids and numbers blurred, so equal failures count together."""
    return re.sub(r"\b[0-9a-f]{8}-[0-9a-f-]{27}\b|\d+(\.\d+)?", "#", error)[:200]


def probe(url: str, body: bytes, timeout: float, tries: int = 3) -> dict[str, Any]:
    """Send the request alone (a warm-up, and a check that the server handles the image at all)."""
    report: dict[str, Any] = {"ok": False}
    with requests.Session() as session:
        for attempt in range(1, tries + 1):
            started = time.monotonic()
            try:
                response = session.post(
                    url, data=body, headers={"Content-Type": "application/json"}, timeout=(5.0, timeout)
                )
            except requests.RequestException as error:
                report.update(attempts=attempt, error=f"{type(error).__name__}: {error}"[:500])
                continue
            report.update(
                attempts=attempt,
                status=response.status_code,
                ms=round((time.monotonic() - started) * 1000.0, 1),
                body=response.text[:500],
            )
            if response.status_code == 200:
                try:
                    payload = response.json()
                    report.update(ok=True, usage=payload.get("usage"), body=None)
                    report["text"] = payload.get("result", None) or _choice_text(payload)
                except ValueError:
                    report["error"] = "200 with a body that is not JSON"
                if report["ok"]:
                    return report
            time.sleep(0.5)
    return report


def _choice_text(payload: dict[str, Any]) -> str | None:
    """The first choice's message content of a chat completion, if any."""
    try:
        return str(payload["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        return None


LOG_PATTERNS = re.compile(
    r"continuous batching|CB: (True|False)|Traceback|Error|error|exception|WARNING|Falling back",
    re.IGNORECASE,
)


def log_highlights(path: Path, limit: int = 12) -> list[str]:
    """Distinct log lines worth reading (batching decisions, errors), numbers blurred, first few."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    seen: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or not LOG_PATTERNS.search(line):
            continue
        key = _error_kind(line)
        if key not in seen:
            seen[key] = line[:300]
        if len(seen) >= limit:
            break
    return list(seen.values())


# ----- the model alone -----


def model_only(model_dir: Path, image_path: Path, args: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    """Run bench/model_time.py in a fresh process and return its result (or the failure)."""
    command = [
        sys.executable, str(BENCH / "model_time.py"), "--model", str(model_dir), "--image", str(image_path),
        "--prompt", PROMPT, "--max-new-tokens", str(args.max_new_tokens), "--batch", str(args.batch),
        "--runs", str(args.model_runs),
    ]  # fmt: skip
    # (warm-up + timed runs) x (one request + one batch): allow for long answers (--max-new-tokens 256).
    limit = 300.0 * max(1.0, args.max_new_tokens / 64)
    try:
        done = subprocess.run(
            command, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=limit, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"model_time.py took over {limit:.0f} s; log: {log_path}"}
    log_path.write_text(done.stdout + done.stderr)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": f"model_time.py exited {done.returncode} without a result; log: {log_path}"}


# ----- report -----


def fmt(value: float, digits: int = 1) -> str:
    """A number for the table, '-' for nan."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def print_table(results: list[LevelResult]) -> None:
    """The main table: one row per server and concurrency."""
    header = (
        "server", "clients", "req/s", "out tok/s", "p50 ms", "p95 ms", "p99 ms", "ok", "errors",
        "cpu srv%", "bench%", "other%",
    )  # fmt: skip
    rows = [
        (r.server, str(r.clients), fmt(r.req_per_s, 2), fmt(r.tokens_per_s, 1), fmt(r.p50_ms), fmt(r.p95_ms),
         fmt(r.p99_ms), str(r.requests), str(r.errors), fmt(r.cpu_pct.get("server", math.nan), 0),
         fmt(r.cpu_pct.get("bench", math.nan), 0), fmt(r.cpu_pct.get("other", math.nan), 0))
        for r in results
    ]  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def median_results(rounds: list[list[LevelResult]]) -> list[LevelResult]:
    """Per server and concurrency, the median of each figure over the rounds (errors summed)."""
    groups: dict[tuple[str, int], list[LevelResult]] = collections.defaultdict(list)
    for this_round in rounds:
        for r in this_round:
            groups[(r.server, r.clients)].append(r)
    merged: list[LevelResult] = []
    for server in dict.fromkeys(r.server for r in rounds[0]):
        for clients in sorted({c for (s, c) in groups if s == server}):
            runs = groups[(server, clients)]

            def median(attribute: str, runs: list[LevelResult] = runs) -> float:
                return statistics.median(getattr(r, attribute) for r in runs)

            merged.append(
                replace(
                    runs[0],
                    requests=sum(r.requests for r in runs),
                    errors=sum(r.errors for r in runs),
                    req_per_s=median("req_per_s"),
                    tokens_per_s=median("tokens_per_s"),
                    p50_ms=median("p50_ms"),
                    p95_ms=median("p95_ms"),
                    p99_ms=median("p99_ms"),
                    warmup_s=median("warmup_s"),
                    latencies_ms=[x for r in runs for x in r.latencies_ms],
                )
            )
    return merged


def comparisons(results: list[LevelResult]) -> list[str]:
    """glmvision against the best peer at each concurrency, and p50 at one client."""
    lines: list[str] = []
    by_clients: dict[int, list[LevelResult]] = collections.defaultdict(list)
    for r in results:
        by_clients[r.clients].append(r)
    for clients in sorted(by_clients):
        level = by_clients[clients]
        ours = next((r for r in level if r.server == "glmvision"), None)
        peers = [r for r in level if r.server != "glmvision" and r.requests > 0]
        if ours is None or not peers:
            continue
        best = max(peers, key=lambda r: r.req_per_s)
        ratio = ours.req_per_s / best.req_per_s if best.req_per_s else math.nan
        lines.append(
            f"{clients:>3} clients: glmvision {ours.req_per_s:.2f} req/s / best peer {best.server} "
            f"{best.req_per_s:.2f} req/s = {fmt(ratio, 2)}x"
        )
    one = by_clients.get(1, [])
    ours = next((r for r in one if r.server == "glmvision" and r.requests > 0), None)
    peers = [r for r in one if r.server != "glmvision" and r.requests > 0]
    if ours is not None and peers:
        best = min(peers, key=lambda r: r.p50_ms)
        lines.append(
            f"p50 at 1 client: glmvision {ours.p50_ms:.1f} ms vs best peer {best.server} "
            f"{best.p50_ms:.1f} ms "
            f"({ours.p50_ms / best.p50_ms:.2f}x, {ours.p50_ms - best.p50_ms:+.1f} ms)"
        )
    return lines


def model_lines(model: dict[str, Any], results: list[LevelResult]) -> list[str]:
    """Model-only timings, and how much of each server's 1-client p50 they explain."""
    if "error" in model:
        return [f"model-only timing failed: {model['error']}"]
    batch = model["batch"]
    one_ms, batch_ms = model["generate_one_ms"], model["generate_batch_ms"]
    prep_ms, prep_batch_ms = model["prepare_one_ms"], model["prepare_batch_ms"]
    lines = [
        f"torch threads {model['torch_threads']}, prompt {model['prompt_tokens']} tokens, "
        f"new tokens {model['new_tokens_single']} (batch: {model['new_tokens_batch']}), "
        f"median of {model['runs']}",
        f"preprocess 1 request (base64 + JPEG decode + apply_chat_template): {prep_ms:.1f} ms",
        f"preprocess {batch} requests as one processor call:                  {prep_batch_ms:.1f} ms",
        f"generate, 1 request alone:          {one_ms:7.1f} ms per call -> {1000.0 / one_ms:6.1f} req/s",
        f"generate, {batch} requests as a batch:  {batch_ms:7.1f} ms per call -> "
        f"{batch * 1000.0 / batch_ms:6.1f} req/s",
        f"preprocess + generate, 1 request:   {prep_ms + one_ms:7.1f} ms -> "
        f"{1000.0 / (prep_ms + one_ms):6.1f} req/s (one at a time)",
        f"preprocess + generate, batch of {batch}: {prep_batch_ms + batch_ms:7.1f} ms -> "
        f"{batch * 1000.0 / (prep_batch_ms + batch_ms):6.1f} req/s",
    ]
    for r in results:
        if r.clients == 1 and r.requests > 0:
            overhead = r.p50_ms - (prep_ms + one_ms)
            lines.append(
                f"server overhead at 1 client, {r.server}: p50 {r.p50_ms:.1f} ms - model path "
                f"{prep_ms + one_ms:.1f} ms = {overhead:+.1f} ms"
            )
    return lines


# ----- main -----


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: " + ",".join(SERVERS))
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="unmeasured seconds before each level (longer, until every client has had an answer)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat all servers N times (rotating the order); report medians",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds per request (the servers' own limit: 64 clients waiting on 256-token answers "
        "from a sequential server queue for tens of seconds each)",
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=240.0, help="seconds for a server to be ready"
    )
    parser.add_argument("--seed-threads", type=int, default=8, help="gthread threads of the seed app")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the model-only timing")
    parser.add_argument("--model-runs", type=int, default=7, help="timed runs of the model-only timing")
    parser.add_argument("--no-model-time", action="store_true", help="skip the model-only timing")
    parser.add_argument(
        "--glmvision-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for glmvision"
    )
    parser.add_argument("--out", default=str(BENCH / "results.json"), help="raw results as JSON")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (model, image, logs)")
    args = parser.parse_args(argv)
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in args.server_list:
        if name not in SERVERS:
            parser.error(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")
    try:
        args.client_list = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        parser.error("--clients takes integers, e.g. 1,4,8,16")
    if not args.client_list or min(args.client_list) < 1 or max(args.client_list) > 256:
        parser.error("--clients takes 1 to 256 clients per level")
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 120:
        parser.error("--duration must be in (0, 600] and --warmup in [0, 120]")
    if args.request_timeout <= 0 or args.max_new_tokens < 1:
        parser.error("--request-timeout must be positive and --max-new-tokens at least 1")
    env: dict[str, str] = {}
    for item in args.glmvision_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--glmvision-env takes KEY=VALUE, got {item!r}")
        env[key] = value
    args.glmvision_env = env
    return args


def build_model(directory: Path) -> None:
    """Build the demo model in a subprocess (the load-driving process never imports torch)."""
    code = (
        "import sys; from glmvision.backends.local.demo import build_demo_model; "
        "build_demo_model(sys.argv[1])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(directory)], cwd=REPO, env=base_env(), check=True, timeout=300
    )


def versions() -> dict[str, Any]:
    """What was measured: package versions, the repository's commit, the machine."""
    from importlib import metadata

    found: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    for package in ("torch", "transformers", "gunicorn", "flask", "fastapi", "uvicorn", "requests"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "glmvision", "deploy", "wsgi.py"],
            cwd=REPO, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        found["commit"] = head.stdout.strip() or None
        found["glmvision_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        found["commit"] = None
    return found


def batch_counters(url: str) -> dict[str, int] | None:
    """`batches` and `rows` counters found anywhere in the ready probe's JSON (glmvision's engine stats)."""
    try:
        payload = requests.get(url, timeout=5.0).json()
    except (requests.RequestException, ValueError):
        return None
    found: dict[str, int] = {}
    pending: list[Any] = [payload]
    for _ in range(1000):  # bounded walk over nested dicts and lists
        if not pending:
            break
        item = pending.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in ("batches", "rows") and isinstance(value, int) and key not in found:
                    found[key] = value
                elif isinstance(value, dict | list):
                    pending.append(value)
        elif isinstance(item, list):
            pending.extend(item)
    return found if len(found) == 2 else None


def machine_busy(seconds: float = 1.0) -> float | None:
    """% of the machine's CPU capacity in use over a short sample (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    return float(psutil.cpu_percent(interval=seconds))


def bench_server(
    name: str, model_dir: Path, image_b64: str, workdir: Path, args: argparse.Namespace
) -> tuple[list[LevelResult], dict[str, Any]]:
    """Start one server, probe it, drive every level, stop it; its rows and a report."""
    port = free_port()
    server = make_server(name, port, model_dir, image_b64, args)
    log_path = workdir / f"{name}.log"
    report: dict[str, Any] = {"command": server.command, "log": str(log_path), "port": port}
    rows: list[LevelResult] = []
    print(f"\n== {name}: {' '.join(server.command)}", flush=True)
    try:
        with running(server, port, log_path, args.startup_timeout) as (base, pgid):
            url = base + server.endpoint
            meter = CpuMeter(pgid)
            report["probe"] = probe(url, server.body, args.request_timeout)
            print(f"   probe: {_probe_summary(report['probe'])}", flush=True)
            counters = batch_counters(base + server.ready_path)
            report["batching"] = {}
            for clients in args.client_list:
                row = run_level(
                    name, url, server.body, clients, args.warmup, args.duration, args.request_timeout, meter
                )
                rows.append(row)
                after = batch_counters(base + server.ready_path)
                batching = ""
                if counters and after and after["batches"] > counters["batches"]:
                    rows_done, batches = (
                        after["rows"] - counters["rows"],
                        after["batches"] - counters["batches"],
                    )
                    report["batching"][clients] = {"batches": batches, "rows": rows_done}
                    batching = f"  mean batch {rows_done / batches:.2f} ({batches} generate calls)"
                counters = after
                print(
                    f"   {clients:>3} clients: {row.req_per_s:7.2f} req/s  p50 {fmt(row.p50_ms):>7} ms  "
                    f"errors {row.errors}{batching}  (warm-up {row.warmup_s:.1f} s, {row.requests} counted)",
                    flush=True,
                )
    except ServerFailed as error:
        report["failed"] = str(error)
        print(f"   FAILED: {error}", flush=True)
    report["notes"] = server.notes
    report["log_highlights"] = log_highlights(log_path)
    if not rows:  # it never served: one row per level saying so
        rows = [
            LevelResult(name, c, args.duration, 0, 1, 0.0, 0.0, math.nan, math.nan, math.nan, math.nan, 0, 0,
                        {report.get("failed", "no result"): 1})
            for c in args.client_list
        ]  # fmt: skip
    return rows, report


def _probe_summary(probe_report: dict[str, Any]) -> str:
    """One line about the probe request."""
    if probe_report.get("ok"):
        return f"OK {probe_report.get('ms')} ms, usage {probe_report.get('usage')}"
    return (
        f"FAILED after {probe_report.get('attempts')} tries: status {probe_report.get('status')}, "
        f"{probe_report.get('error') or probe_report.get('body')}"
    )


def missing_modules(server_list: list[str]) -> list[str]:
    """Modules this interpreter lacks for the chosen servers (they all run with sys.executable)."""
    needed = {"numpy", "PIL", "torch", "transformers"}
    if {"glmvision", "seed"} & set(server_list):
        needed |= {"flask", "gunicorn"}
    if {"hf", "hf-cb"} & set(server_list):
        needed |= {"fastapi", "uvicorn"}
    return sorted(name for name in needed if importlib.util.find_spec(name) is None)


def main(argv: list[str] | None = None) -> int:
    """Run the whole benchmark once; exit 1 if a server failed to start or any request failed."""
    args = parse_args(argv)
    missing = missing_modules(args.server_list)
    if missing:
        print(
            f"{sys.executable} lacks {', '.join(missing)}: run the bench with the repository's .venv, "
            "after .venv/bin/pip install -r requirements-bench.txt: .venv/bin/python bench/run.py ...",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="glmvision-bench-"))
    model_dir, image_path = workdir / "demo-model", workdir / "request.jpg"
    keep = args.keep_temp
    started = time.monotonic()
    try:
        print(f"temp dir: {workdir}", flush=True)
        build_model(model_dir)
        image = make_image()
        image_path.write_bytes(image)
        image_b64 = base64.b64encode(image).decode()
        print(f"image: {IMAGE_SIDE}x{IMAGE_SIDE} JPEG, {len(image) / 1024:.0f} KiB", flush=True)
        idle = machine_busy()
        if idle is not None:
            print(f"machine busy before the run: {idle:.0f}% of {os.cpu_count()} cores", flush=True)
            if idle > 10.0:
                print("  warning: something else is using the CPU; the numbers will be skewed", flush=True)
        rounds: list[list[LevelResult]] = []
        reports: dict[str, Any] = {}
        for round_no in range(args.rounds):
            # Each round starts with a different server, so the machine's drift spreads evenly.
            shift = round_no % len(args.server_list)
            order = args.server_list[shift:] + args.server_list[:shift]
            if args.rounds > 1:
                print(f"\n##### round {round_no + 1} of {args.rounds}: {', '.join(order)}", flush=True)
            this_round: list[LevelResult] = []
            for name in order:
                rows, reports[name] = bench_server(name, model_dir, image_b64, workdir, args)
                this_round.extend(rows)
            rounds.append(this_round)
        results = median_results(rounds) if args.rounds > 1 else rounds[0]
        if args.rounds > 1:
            print("\n== each round on its own")
            for round_no, this_round in enumerate(rounds, 1):
                for line in comparisons(this_round):
                    print(f"  round {round_no}: {line}")
        model: dict[str, Any] = {}
        if not args.no_model_time:
            print("\n== model only (model_time.py)", flush=True)
            model = model_only(model_dir, image_path, args, workdir / "model_time.log")
        failed = any(r.errors for r in results) or any("failed" in rep for rep in reports.values())
        keep = keep or failed or "error" in model
        _report(results, reports, model, args)
        raw = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("server_list", "client_list")},
            "prompt": PROMPT,
            "image_bytes": len(image),
            "versions": versions(),
            "servers": reports,
            "results": [_no_nan(asdict(r)) for r in results],
            "model_only": model,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        Path(args.out).write_text(json.dumps(raw, indent=2, default=_json_default) + "\n")
        print(f"\nraw results: {args.out}   (whole run {time.monotonic() - started:.0f} s)")
        if failed:
            print(f"some requests failed or a server did not start: logs kept in {workdir}")
        return 1 if failed else 0
    except BaseException:
        keep = True
        print(f"\nbenchmark aborted; logs kept in {workdir}", file=sys.stderr, flush=True)
        raise
    finally:
        if keep:
            print(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _report(
    results: list[LevelResult], reports: dict[str, Any], model: dict[str, Any], args: argparse.Namespace
) -> None:
    """Print the table, the comparisons, what each server did, and the model-only timing."""
    print(
        f"\n== results: closed loop, {args.duration:.0f} s per level after a warm-up (at least "
        f"{args.warmup:.0f} s, and until every client had an answer), "
        f"{IMAGE_SIDE}x{IMAGE_SIDE} JPEG, max {args.max_new_tokens} new tokens, greedy\n"
    )
    print_table(results)
    print(
        f"(cpu: share of the machine's {os.cpu_count()} cores over each level, warm-up included, used by the "
        "server's processes, by this bench's client threads, and by anything else on the machine)"
    )
    lines = comparisons(results)
    if lines:
        print("\n== glmvision vs best peer")
        for line in lines:
            print("  " + line)
    print("\n== per server")
    for name, report in reports.items():
        print(f"  {name}: {'; '.join(report.get('notes', []))}")
        if "failed" in report:
            print(f"    FAILED: {report['failed']}")
        elif "probe" in report:
            print(f"    probe: {_probe_summary(report['probe'])}")
        if report.get("batching"):
            means = ", ".join(
                f"{c} clients {v['rows'] / v['batches']:.2f}" for c, v in report["batching"].items()
            )
            print(f"    rows per generate() call (from its ready probe's counters): {means}")
        errors: collections.Counter[str] = collections.Counter()
        for r in results:
            if r.server == name:
                errors.update(r.error_kinds)
        for kind, count in errors.most_common(5):
            print(f"    error x{count}: {kind}")
        for line in level_notes([r for r in results if r.server == name], args):
            print(f"    {line}")
        for line in report.get("log_highlights", [])[:6]:
            print(f"    log: {line}")
        if errors or "failed" in report:
            print(f"    full log: {report['log']}")
    if model:
        print("\n== model.generate() alone (no HTTP, one process)")
        for line in model_lines(model, results):
            print("  " + line)


def level_notes(rows: list[LevelResult], args: argparse.Namespace) -> list[str]:
    """Levels whose figures need care: a warm-up stretched past --warmup, or a thin window."""
    notes: list[str] = []
    for r in rows:
        if r.warmup_s > args.warmup + 1.0:
            notes.append(
                f"{r.clients} clients: warm-up took {r.warmup_s:.1f} s (until every client had an answer)"
            )
        # Fewer answers than clients (per round): most clients never finished a request inside the
        # window, so req/s and the percentiles rest on a few samples.
        if 0 < r.requests < r.clients * args.rounds:
            notes.append(
                f"{r.clients} clients: only {r.requests} answers counted, fewer than clients: "
                f"a longer --duration (above the {fmt(r.p50_ms / 1000.0)} s p50) gives steadier figures"
            )
    return notes


def _no_nan(row: dict[str, Any]) -> dict[str, Any]:
    """The row with nan (no samples) as null, so the JSON stays standard."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _json_default(value: object) -> object:
    """JSON for what json cannot write by itself (paths)."""
    return str(value)


def _raise_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt so servers are stopped on the way out."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
