"""Drills against a real gunicorn: overload, a failing model thread, a soak. Shared by the bounded
tests (tests/test_drills.py) and scripts/robustness.py, which writes docs/robustness.md."""

from __future__ import annotations

import base64
import io
import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from helpers import LiveServer, wait_for
from PIL import Image


def jpeg_b64(size: int = 256) -> str:
    """A patterned JPEG, base64: the drills' image."""
    image = Image.new("RGB", (size, size), (40, 90, 160))
    for x in range(0, size, 16):
        for y in range(size):
            image.putpixel((x, y), (240, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def percentile(values: list[float], share: float) -> float:
    """The `share` quantile (0..1) of `values` by nearest rank; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


@dataclass
class Probe:
    """GET a path every `interval` seconds from its own thread, recording latencies and statuses."""

    url: str
    interval: float = 0.05
    latencies: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = session.get(self.url, timeout=10).status_code
                except requests.RequestException:
                    status = 0
                self.times.append(started)
                self.latencies.append(time.perf_counter() - started)
                self.statuses[status] += 1
                self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class OverloadResult:
    """What the clients and the probes saw."""

    clients: int
    seconds: float
    answered: int = 0
    refused: int = 0
    refused_without_retry_after: int = 0
    other: Counter[str] = field(default_factory=Counter)
    answer_latencies: list[float] = field(default_factory=list)
    refusal_latencies: list[float] = field(default_factory=list)
    health: Probe | None = None
    ready: Probe | None = None
    engine: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        """The numbers docs/robustness.md shows."""
        ms = 1000.0
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "answered (200)": self.answered,
            "refused (503 overloaded)": self.refused,
            "503 without Retry-After": self.refused_without_retry_after,
            "other outcomes": dict(self.other),
            "answer p50 / p99 ms": (
                round(percentile(self.answer_latencies, 0.5) * ms),
                round(percentile(self.answer_latencies, 0.99) * ms),
            ),
            "refusal p50 / p99 / max ms": (
                round(percentile(self.refusal_latencies, 0.5) * ms, 1),
                round(percentile(self.refusal_latencies, 0.99) * ms, 1),
                round(max(self.refusal_latencies, default=0) * ms, 1),
            ),
            "/healthz p50 / p99 / max ms": _probe_figures(self.health),
            "/readyz p50 / p99 / max ms": _probe_figures(self.ready),
            "engine": {k: self.engine.get(k) for k in ("capacity", "refused", "largest_batch", "completed")},
        }


def _probe_figures(probe: Probe | None) -> tuple[float, float, float]:
    if probe is None or not probe.latencies:
        return (0.0, 0.0, 0.0)
    values = probe.latencies
    return (
        round(percentile(values, 0.5) * 1000, 1),
        round(percentile(values, 0.99) * 1000, 1),
        round(max(values) * 1000, 1),
    )


def overload(
    server: LiveServer, clients: int = 200, seconds: float = 20.0, tokens: int = 16
) -> OverloadResult:
    """`clients` closed-loop clients on /v1/chat/vision; each waits Retry-After after a 503."""
    body = {
        "image": jpeg_b64(),
        "prompt": "What is in this picture?",
        "max_new_tokens": tokens,
        "temperature": 0,
    }
    result = OverloadResult(clients, seconds)
    lock = threading.Lock()
    stop = threading.Event()

    def client(number: int) -> None:
        rng = random.Random(number)
        with requests.Session() as session:
            stop.wait(rng.random() * 0.5)  # a ramp, not one thundering instant
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = session.post(server.url + "/v1/chat/vision", json=body, timeout=120)
                    status, code = response.status_code, _code(response)
                    retry_after = response.headers.get("Retry-After")
                except requests.RequestException as exc:
                    status, code, retry_after = 0, type(exc).__name__, None
                elapsed = time.perf_counter() - started
                pause = 0.0
                with lock:
                    if status == 200:
                        result.answered += 1
                        result.answer_latencies.append(elapsed)
                    elif status == 503 and code == "overloaded":
                        result.refused += 1
                        result.refusal_latencies.append(elapsed)
                        if not (retry_after or "").isdigit():
                            result.refused_without_retry_after += 1
                        pause = float(retry_after) if (retry_after or "").isdigit() else 1.0
                    else:
                        result.other[f"{status} {code}"] += 1
                        pause = 1.0
                # Well-behaved clients wait as told, with jitter so they do not return in lockstep.
                stop.wait(pause * rng.uniform(0.5, 1.0))

    result.health = Probe(server.url + "/healthz")
    result.ready = Probe(server.url + "/readyz")
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    threads += [threading.Thread(target=p.run, daemon=True) for p in (result.health, result.ready)]
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    result.health.stop()
    result.ready.stop()
    for thread in threads:
        thread.join(timeout=150)
    result.engine = requests.get(server.url + "/readyz", timeout=10).json().get("engine", {})
    return result


def _code(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", {}).get("code", ""))
    except ValueError:
        return "not-json"


@dataclass
class Footprint:
    """One worker's resident memory, threads and open descriptors, from /proc."""

    rss_mib: float
    threads: int
    fds: int


def footprint(pid: int) -> Footprint:
    """Read a process's footprint from /proc (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kib = int(fields["VmRSS"].split()[0])
    return Footprint(round(rss_kib / 1024, 1), int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd")))


def mixed_requests(url: str) -> list[Callable[[requests.Session], requests.Response]]:
    """Good and bad requests in the shapes clients send: the soak's menu."""
    good = {"image": jpeg_b64(96), "prompt": "Describe it.", "max_new_tokens": 4, "temperature": 0}
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What colour?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + good["image"]}},
                ],
            }
        ],
        "max_tokens": 4,
    }
    vision, completions = url + "/v1/chat/vision", url + "/v1/chat/completions"
    return [
        lambda s: s.post(vision, json=good, timeout=60),
        lambda s: s.post(completions, json=chat, timeout=60),
        lambda s: s.post(completions, json={**chat, "stream": True}, timeout=60),
        lambda s: s.post(vision, json={**good, "image": "!!not base64!!"}, timeout=60),
        lambda s: s.post(vision, json={**good, "prompt": ""}, timeout=60),
        lambda s: s.post(vision, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=60),
        lambda s: s.post(vision, json={**good, "max_new_tokens": "5"}, timeout=60),
        lambda s: s.post(vision, json={**good, "image": base64.b64encode(b"GIF89a" + b"\0" * 20).decode()}),
        lambda s: s.post(completions, json={**chat, "n": 3}, timeout=60),
        lambda s: s.get(url + "/v1/models", timeout=60),
        lambda s: s.get(url + "/healthz", timeout=60),
        lambda s: s.get(url + "/nope", timeout=60),
    ]


@dataclass
class SoakResult:
    """Counts by status, and the worker's footprint before and after."""

    requests: int
    statuses: Counter[int]
    server_errors: int
    before: Footprint
    after: Footprint
    samples: list[Footprint]


def soak(server: LiveServer, total: int = 3000, clients: int = 8) -> SoakResult:
    """`total` mixed good and bad requests from `clients` threads; footprint sampled as it goes."""
    (pid,) = server.worker_pids()
    menu = mixed_requests(server.url)
    # Warm every path once so lazily built things (the model, caches) count before the baseline.
    with requests.Session() as session:
        for call in menu:
            call(session)
    wait_for(lambda: footprint(pid).threads > 0)
    before = footprint(pid)
    statuses: Counter[int] = Counter()
    samples: list[Footprint] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        with requests.Session() as session:
            for number in counter:
                response = menu[number % len(menu)](session)
                response.content  # noqa: B018 - read the whole body (streams included)
                with lock:
                    statuses[response.status_code] += 1
                    if number % 250 == 0:
                        samples.append(footprint(pid))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    time.sleep(0.5)  # let keep-alive connections settle before the last reading
    after = footprint(pid)
    errors = sum(count for status, count in statuses.items() if status >= 500)
    return SoakResult(sum(statuses.values()), statuses, errors, before, after, samples)


def median_or_zero(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
