"""Drills against a real gunicorn: overload, a failing model thread, a soak. Shared by the bounded
tests (tests/test_drills.py) and scripts/robustness.py, which writes docs/robustness.md."""

from __future__ import annotations

import base64
import io
import multiprocessing
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from helpers import ROOT, LiveServer, wait_for
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
    refusal_times: list[float] = field(default_factory=list)
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


Row = tuple[int, str, float, str | None, float]  # status, error code, seconds, Retry-After, start


CLIENT_NICENESS = 10


def _client_process(
    url: str,
    body: dict[str, Any],
    first: int,
    count: int,
    seconds: float,
    out: Any,
    retry_pause: float | None = None,
    answered: Any = None,
) -> None:
    """`count` closed-loop client threads in one process; puts their rows on `out`. After a refusal a
    client waits Retry-After (polite) or `retry_pause` seconds; with `answered` (an Event) all stop
    at the first 200 any of them gets."""
    # Real clients are on other machines; here they share the server's cores, so they yield to it
    # (and to the probes) rather than time their own scheduling.
    os.nice(CLIENT_NICENESS)
    rows: list[Row] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(number: int) -> None:
        rng = random.Random(number)
        with requests.Session() as session:
            stop.wait(rng.random() * 0.5)  # a ramp, not one thundering instant
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = session.post(url + "/v1/chat/vision", json=body, timeout=120)
                    status, code = response.status_code, _code(response)
                    retry_after = response.headers.get("Retry-After")
                except requests.RequestException as exc:
                    status, code, retry_after = 0, type(exc).__name__, None
                with lock:
                    rows.append((status, code, time.perf_counter() - started, retry_after, started))
                pause = 0.0
                if status == 200 and answered is not None:
                    answered.set()
                elif status != 200 and retry_pause is not None:
                    pause = retry_pause  # an impatient client: back almost at once
                elif status != 200:
                    pause = float(retry_after) if (retry_after or "").isdigit() else 1.0
                # Well-behaved clients wait as told, with jitter so they do not return in lockstep.
                stop.wait(pause * rng.uniform(0.5, 1.0))

    threads = [threading.Thread(target=client, args=(first + n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    if answered is not None:
        answered.wait(seconds)
    else:
        stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=150)
    out.put(("clients", rows))


def _probe_process(url: str, seconds: float, out: Any) -> None:
    probe = Probe(url)
    thread = threading.Thread(target=probe.run, daemon=True)
    thread.start()
    time.sleep(seconds)
    probe.stop()
    thread.join(timeout=15)
    out.put((url, (probe.times, probe.latencies, dict(probe.statuses))))


def overload(
    server: LiveServer,
    clients: int = 200,
    seconds: float = 20.0,
    tokens: int = 16,
    processes: int = 4,
    retry_pause: float | None = None,
) -> OverloadResult:
    """`clients` closed-loop clients on /v1/chat/vision, each waiting Retry-After after a 503 (or
    `retry_pause` seconds, as impatient clients do).

    Clients and probes run in processes of their own, so what they time is the server, not the
    test process's own GIL.
    """
    # Sampled, so not cacheable: every request is model work, as distinct requests would be.
    body = {"image": jpeg_b64(), "prompt": "Describe it.", "max_new_tokens": tokens, "temperature": 0.7}
    result = OverloadResult(clients, seconds)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    share = -(-clients // processes)
    jobs = [
        context.Process(
            target=_client_process,
            args=(server.url, body, start, min(share, clients - start), seconds, out, retry_pause),
        )
        for start in range(0, clients, share)
    ]
    probes = {server.url + "/healthz": "health", server.url + "/readyz": "ready"}
    jobs += [context.Process(target=_probe_process, args=(url, seconds, out)) for url in probes]
    for job in jobs:
        job.start()
    reports = [out.get(timeout=seconds + 200) for _ in jobs]
    for job in jobs:
        job.join(timeout=30)
    for kind, report in reports:
        if kind != "clients":
            probe = Probe(kind)
            probe.times, probe.latencies, probe.statuses = report[0], report[1], Counter(report[2])
            setattr(result, probes[kind], probe)
            continue
        for status, code, elapsed, retry_after, started in report:
            if status == 200:
                result.answered += 1
                result.answer_latencies.append(elapsed)
            elif status == 503 and code == "overloaded":
                result.refused += 1
                result.refusal_latencies.append(elapsed)
                result.refusal_times.append(started)
                result.refused_without_retry_after += not (retry_after or "").isdigit()
            else:
                result.other[f"{status} {code}"] += 1
    result.engine = requests.get(server.url + "/readyz", timeout=10).json().get("engine", {})
    return result


def goodput(result: OverloadResult) -> float:
    """Answers per second."""
    return result.answered / result.seconds


def storm(url: str, clients: int = 200, bound: float = 120.0, processes: int = 4) -> float | None:
    """`clients` clients that retry 50 ms after each 503, from now until the first 200 any of them
    gets (at most `bound` seconds): the seconds until that answer, None if none came."""
    body = {"image": jpeg_b64(), "prompt": "Describe it.", "max_new_tokens": 4, "temperature": 0.7}
    context = multiprocessing.get_context("fork")
    out, answered = context.Queue(), context.Event()
    share = -(-clients // processes)
    started = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process
    jobs = [
        context.Process(
            target=_client_process,
            args=(url, body, first, min(share, clients - first), bound, out, 0.05, answered),
        )
        for first in range(0, clients, share)
    ]
    for job in jobs:
        job.start()
    rows: list[Row] = []
    for _ in jobs:
        rows.extend(out.get(timeout=bound + 200)[1])
    for job in jobs:
        job.join(timeout=30)
    answers = [begun + elapsed for status, _, elapsed, _, begun in rows if status == 200]
    return min(answers) - started if answers else None


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
    # Sampled, so not cacheable: the soak is of model work, not of cache hits.
    good = {"image": jpeg_b64(96), "prompt": "Describe it.", "max_new_tokens": 4, "temperature": 0.7}
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
    """Counts by status, and the worker's footprint after a warm-up round and at the end."""

    requests: int
    statuses: Counter[int]
    server_errors: int
    before: Footprint
    after: Footprint
    samples: list[Footprint]
    engine_before: Footprint | None = None  # the engine process's, with GLMVISION_ENGINE=process
    engine_after: Footprint | None = None

    def figures(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by status": dict(sorted(self.statuses.items())),
            "5xx": self.server_errors,
            "RSS MiB (after warm-up -> end)": (self.before.rss_mib, self.after.rss_mib),
            "threads": (self.before.threads, self.after.threads),
            "open fds": (self.before.fds, self.after.fds),
            "RSS MiB samples": [sample.rss_mib for sample in self.samples],
            **(
                {
                    "engine RSS MiB": (self.engine_before.rss_mib, self.engine_after.rss_mib),
                    "engine threads": (self.engine_before.threads, self.engine_after.threads),
                    "engine open fds": (self.engine_before.fds, self.engine_after.fds),
                }
                if self.engine_before is not None and self.engine_after is not None
                else {}
            ),
        }


def _hammer(
    menu: list[Callable[[requests.Session], requests.Response]], total: int, clients: int
) -> Counter[int]:
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    numbers = iter(range(total))

    def client() -> None:
        with requests.Session() as session:
            for number in numbers:
                response = menu[number % len(menu)](session)
                response.content  # noqa: B018 - read the whole body (streams included)
                with lock:
                    statuses[response.status_code] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=900)
    return statuses


def soak(server: LiveServer, total: int = 3000, clients: int = 8, rounds: int = 5) -> SoakResult:
    """`total` mixed good and bad requests from `clients` threads, after a warm-up round of the same."""
    (pid,) = server.worker_pids()
    engine = next(iter(server.engine_pids()), None)  # GLMVISION_ENGINE=process: its footprint too
    menu = mixed_requests(server.url)
    # The warm-up grows what grows once (thread pools, allocator arenas, caches) before the baseline.
    _hammer(menu, max(len(menu) * clients, total // rounds), clients)
    before = footprint(pid)
    engine_before = footprint(engine) if engine is not None else None
    statuses: Counter[int] = Counter()
    samples = [before]
    for _ in range(rounds):
        statuses.update(_hammer(menu, total // rounds, clients))
        samples.append(footprint(pid))
    after = samples[-1]
    engine_after = footprint(engine) if engine is not None else None
    errors = sum(count for status, count in statuses.items() if status >= 500)
    result = SoakResult(sum(statuses.values()), statuses, errors, before, after, samples)
    result.engine_before, result.engine_after = engine_before, engine_after
    return result


FAULT_HOOK = """
import os
_marker = os.environ.get("DRILL_FAULT_FILE")
if _marker:
    import glmvision.backends.local.continuous as _continuous
    import glmvision.backends.local.static as _static

    def _faulty(real):
        def run(self, *args):
            try:
                os.unlink(_marker)  # the fault fires once, in the first model call after the file appears
            except FileNotFoundError:
                return real(self, *args)
            raise RuntimeError("injected fault in the model thread")

        return run

    _static.StaticEngine._generate = _faulty(_static.StaticEngine._generate)
    _continuous.ContinuousEngine._step = _faulty(_continuous.ContinuousEngine._step)
"""


def fault_hook_env(directory: Path) -> dict[str, str]:
    """Environment for a server whose model thread raises once a marker file appears (sitecustomize)."""
    (directory / "sitecustomize.py").write_text(FAULT_HOOK)
    # This checkout after the hook's directory: the server runs this code, whatever the venv installed.
    path = os.pathsep.join((str(directory), str(ROOT)))
    return {"PYTHONPATH": path, "DRILL_FAULT_FILE": str(directory / "fault-now")}


def model_pids(server: LiveServer) -> set[int]:
    """The processes that hold the model: the engine processes, else (GLMVISION_ENGINE=thread) the workers."""
    return server.engine_pids() or server.worker_pids()


def replaced_and_ready(server: LiveServer, old_pid: int) -> bool:
    """The one process holding the model is a new one, and it is ready."""
    pids = model_pids(server)
    if len(pids) != 1 or old_pid in pids:
        return False
    try:
        return requests.get(server.url + "/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@dataclass
class FaultResult:
    """What the held requests got, and how long until a fresh worker was ready."""

    outcomes: Counter[str]
    old_pid: int
    new_pid: int
    recovered_seconds: float
    after: int

    def figures(self) -> dict[str, Any]:
        return {
            "held requests' outcomes": dict(self.outcomes),
            "model's process replaced": self.old_pid != self.new_pid,
            "seconds from fault to /readyz 200": round(self.recovered_seconds, 1),
            "status of the next request": self.after,
        }


def fault(server: LiveServer, directory: Path, requests_held: int = 12) -> FaultResult:
    """Fire the fault hook under load: every held request must be answered, then a fresh engine (or
    worker, with GLMVISION_ENGINE=thread) serves."""
    (old_pid,) = model_pids(server)
    body = {"image": jpeg_b64(96), "prompt": "Go on.", "max_new_tokens": 64, "temperature": 0.7}
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def call() -> None:
        try:
            response = requests.post(server.url + "/v1/chat/vision", json=body, timeout=120)
            outcome = f"{response.status_code} {_code(response) or 'ok'}"
        except requests.RequestException as exc:
            outcome = f"no answer ({type(exc).__name__})"
        with lock:
            outcomes[outcome] += 1

    (directory / "fault-now").touch()
    fired = time.monotonic()
    threads = [threading.Thread(target=call) for _ in range(requests_held)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)

    wait_for(lambda: replaced_and_ready(server, old_pid), timeout=120)
    recovered = time.monotonic() - fired
    pids = model_pids(server)
    after = requests.post(server.url + "/v1/chat/vision", json={**body, "max_new_tokens": 4}, timeout=60)
    return FaultResult(outcomes, old_pid, next(iter(pids), old_pid), recovered, after.status_code)
