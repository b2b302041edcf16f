#!/usr/bin/env python3
"""Encoder and prefix caches on against off (issue 23): a chat about one photo, many questions about one.

`.venv/bin/python bench/caches.py [--quick] [--turns 5] [--questions 24] [--clients 4] [--configs on,off,hf]`

Builds the demo model with `--full-image-budget` (a 2048x1536 photo is ~4,000 visual tokens) in a temp
dir, then for each configuration starts a server on a free port, sends one warm-up request (its own
image, so the measured images start cold), and runs two workloads, each on an image no earlier request
sent:

- chat: `--chats` conversations of `--turns` turns about one 2048x1536 JPEG, as a chat client sends
  them (the image in the first user message, every earlier answer as an assistant message), streamed
  OpenAI chat completions; time to first token = until the first content or reasoning delta;
- questions: `--questions` different questions about one 2048x1536 JPEG from `--clients` concurrent
  clients (one request each, taken in turn from a shared list); req/s = questions / wall time.

Configurations: glmvision as deployed (real gunicorn, engine process) with the caches on (the defaults)
and off (GLMVISION_ENCODER_CACHE_MB=0, GLMVISION_PREFIX_CACHE=0), the response cache off in both; and
`transformers serve` (`hf`, `--no-continuous-batching`; `hf-cb` with it) as the peer. Prints a table and
whether issue 23's goals are met: follow-up TTFT at most 0.3x turn 1's, questions req/s at least 2x
the caches-off figure.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_image
import run as load

HERE = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 240.0
CONFIGS = ("on", "off", "hf", "hf-cb")
# Off: both caches of issue 23. The response cache is off in every glmvision configuration
# (glmvision_server sets GLMVISION_CACHE=off): it would answer a repeated greedy request from memory.
CACHES_OFF = {"ENCODER_CACHE_MB": "0", "PREFIX_CACHE": "0"}
FOLLOW_UP_GOAL = 0.3  # follow-up TTFT / turn-1 TTFT, at most
THROUGHPUT_GOAL = 2.0  # questions req/s with the caches / without, at least
CHAT = (
    "Describe this photo.",
    "What colours stand out the most?",
    "Is there anything in the top left corner?",
    "What time of day could it be?",
    "Summarise the photo in three words.",
)
QUESTIONS = (
    "What is in the centre of this photo?",
    "Which colour covers most of the photo?",
    "Is the photo brighter on the left or on the right?",
    "Describe the texture you see.",
    "Would this make a good desktop background?",
    "What might the photographer have wanted to show?",
)


@dataclass
class Turn:
    """One streamed request as the client saw it."""

    ttft_ms: float = math.nan
    total_ms: float = math.nan
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    first_from_finish: bool = False  # no content delta came: ttft is the finish chunk's arrival
    text: str = ""
    error: str = ""


@dataclass
class Result:
    """One configuration's figures."""

    name: str
    chats: list[list[Turn]] = field(default_factory=list)
    questions: int = 0
    questions_ok: int = 0
    questions_s: float = math.nan
    rounds_req_per_s: list[float] = field(default_factory=list)  # one per round: questions_ok / questions_s
    question_cached: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ready_s: float = math.nan
    warmup_ms: float = math.nan
    cpu: list[dict[str, float]] = field(default_factory=list)  # server/bench/other % per round

    @property
    def turn1_ms(self) -> float:
        values = [chat[0].ttft_ms for chat in self.chats if chat and not chat[0].error]
        return statistics.median(values) if values else math.nan

    @property
    def follow_up_ms(self) -> float:
        values = [turn.ttft_ms for chat in self.chats for turn in chat[1:] if not turn.error]
        return statistics.median(values) if values else math.nan

    @property
    def req_per_s(self) -> float:
        return statistics.median(self.rounds_req_per_s) if self.rounds_req_per_s else math.nan


def _cached(usage: dict[str, Any] | None) -> int | None:
    """usage.prompt_tokens_details.cached_tokens, None when the server does not report it."""
    details = (usage or {}).get("prompt_tokens_details")
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return int(value) if isinstance(value, int) else None


def image_part(image_b64: str) -> dict[str, Any]:
    """An OpenAI image_url content part holding the JPEG as a data URL."""
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + image_b64}}


def stream_turn(
    session: requests.Session, url: str, body: dict[str, Any], timeout: float
) -> tuple[Turn, dict[str, Any] | None]:
    """Send one streamed chat completion; the turn's timings, its answer text and its usage."""
    turn = Turn()
    usage: dict[str, Any] | None = None
    start = time.monotonic()
    try:
        with session.post(url, json=body, stream=True, timeout=(5.0, timeout)) as response:
            if response.status_code != 200:
                turn.error = f"HTTP {response.status_code} {response.text[:200]}"
                return turn, None
            for raw in response.iter_lines():
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    turn.error = f"stream error {json.dumps(chunk['error'])[:200]}"
                    return turn, None
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = delta.get("content") or ""
                    thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    if (piece or thought) and math.isnan(turn.ttft_ms):
                        turn.ttft_ms = (time.monotonic() - start) * 1000.0
                    turn.text += piece
                    if choice.get("finish_reason") and math.isnan(turn.ttft_ms):
                        # An answer of special tokens only shows no text: its end is the first sign.
                        turn.ttft_ms = (time.monotonic() - start) * 1000.0
                        turn.first_from_finish = True
    except (requests.RequestException, ValueError) as error:
        turn.error = f"{type(error).__name__}: {error}"[:200]
        return turn, None
    turn.total_ms = (time.monotonic() - start) * 1000.0
    if math.isnan(turn.ttft_ms):
        turn.error = "stream ended without a delta or a finish reason"
    if usage:
        turn.prompt_tokens = usage.get("prompt_tokens")
        turn.cached_tokens = _cached(usage)
    return turn, usage


def chat(
    url: str, model: str | None, image_b64: str, turns: int, max_tokens: int, timeout: float
) -> list[Turn]:
    """One conversation about one image, each turn carrying the earlier answers as a chat client does."""
    messages: list[dict[str, Any]] = []
    done: list[Turn] = []
    with requests.Session() as session:
        for index in range(turns):
            question = CHAT[index % len(CHAT)] + (f" ({index + 1})" if index >= len(CHAT) else "")
            content: Any = (
                [image_part(image_b64), {"type": "text", "text": question}] if index == 0 else question
            )
            messages.append({"role": "user", "content": content})
            body: dict[str, Any] = {
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if model:
                body["model"] = model
            turn, _ = stream_turn(session, url, body, timeout)
            done.append(turn)
            if turn.error:
                break
            messages.append({"role": "assistant", "content": turn.text})
    return done


def ask(
    session: requests.Session, url: str, model: str | None, image_b64: str, question: str, max_tokens: int,
    timeout: float,
) -> tuple[bool, int | None, str]:  # fmt: skip
    """One whole (unstreamed) question about the image; (ok, cached tokens, error)."""
    body: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": [image_part(image_b64), {"type": "text", "text": question}]}
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if model:
        body["model"] = model
    try:
        response = session.post(url, json=body, timeout=(5.0, timeout))
    except requests.RequestException as error:
        return False, None, f"{type(error).__name__}: {error}"[:200]
    if response.status_code != 200:
        return False, None, f"HTTP {response.status_code} {response.text[:200]}"
    try:
        usage = response.json()["usage"]
    except (ValueError, KeyError, TypeError):
        return False, None, "HTTP 200 without usage"
    return True, _cached(usage), ""


def questions(
    url: str, model: str | None, image_b64: str, count: int, clients: int, max_tokens: int, timeout: float,
    result: Result,
) -> None:  # fmt: skip
    """`count` different questions about one image from `clients` threads; this round's figures."""
    result.questions = result.questions_ok = 0
    pending = [f"{QUESTIONS[i % len(QUESTIONS)]} (question {i + 1})" for i in range(count)]
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if not pending:
                        return
                    question = pending.pop(0)
                ok, cached, error = ask(session, url, model, image_b64, question, max_tokens, timeout)
                with lock:
                    result.questions += 1
                    if ok:
                        result.questions_ok += 1
                        if cached is not None:
                            result.question_cached.append(cached)
                    else:
                        result.errors.append(f"question: {error}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.questions_s = time.monotonic() - start
    result.rounds_req_per_s.append(result.questions_ok / result.questions_s)


def server_for(name: str, port: int, model: Path, runtime: Path, env: list[str]) -> load.Server:
    """How one configuration starts: glmvision with the caches on or off, or transformers serve."""
    if name in ("hf", "hf-cb"):
        # bench/run.py's command line for the peer; its request body is not used here.
        return load.make_server(name, port, model, "", SimpleNamespace(max_new_tokens=1))  # type: ignore[arg-type]
    settings = CACHES_OFF if name == "off" else {}
    spec = load.glmvision_server(f"caches {name}", HERE, port, runtime, str(model), **settings)
    spec.env.update(item.split("=", 1) for item in env)
    return spec


def measure(
    result: Result, warm_image: str, chat_images: list[str], question_image: str, model: Path,
    args: argparse.Namespace, tmp: Path,
) -> None:  # fmt: skip
    """Start one configuration, warm it up, run the chats and the questions, stop it; adds to `result`."""
    name, chats_before = result.name, len(result.chats)
    port = load.free_port()
    runtime = tmp / f"run-{port}"
    runtime.mkdir(mode=0o700)
    spec = server_for(name, port, model, runtime, args.env)
    peer = name.startswith("hf")
    model_name = str(model) if peer else None
    log = tmp / f"{name}-{port}.log"
    started = time.monotonic()
    try:
        with load.running(spec, port, log, READY_TIMEOUT_S) as (base, pgid):
            result.ready_s = time.monotonic() - started
            url = base + "/v1/chat/completions"
            # The first request also loads the model (transformers serve loads it lazily): not measured.
            with requests.Session() as session:
                begin = time.monotonic()
                ok, _, error = ask(session, url, model_name, warm_image, "Warm up.", args.max_tokens, 600.0)
                result.warmup_ms = (time.monotonic() - begin) * 1000.0
            if not ok:
                result.errors.append(f"warm-up: {error}")
                return
            meter = load.CpuMeter(pgid)
            before = meter.snapshot()
            for image in chat_images:
                result.chats.append(chat(url, model_name, image, args.turns, args.max_tokens, args.timeout))
                result.errors.extend(f"chat: {t.error}" for t in result.chats[-1] if t.error)
            questions(
                url, model_name, question_image, args.questions, args.clients, args.max_tokens, args.timeout,
                result,
            )  # fmt: skip
            result.cpu.append(meter.shares(before, meter.snapshot()))
    except load.ServerFailed as error:
        result.errors.append(str(error))
    finally:
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            if log.exists():
                shutil.copy(log, args.logs / log.name)
    ttfts = ", ".join(f"{t.ttft_ms:.0f}" for c in result.chats[chats_before:] for t in c)
    cpu = result.cpu[-1] if result.cpu else {}
    print(
        f"  {name}: ready in {result.ready_s:.0f} s, warm-up {result.warmup_ms:.0f} ms; "
        f"chat TTFT ms [{ttfts}]; "
        f"{result.questions_ok}/{args.questions} questions in {result.questions_s:.1f} s; "
        f"{len(result.errors)} errors so far; CPU server/other {cpu.get('server', math.nan):.0f}/"
        f"{cpu.get('other', math.nan):.0f}%",
        flush=True,
    )


def _fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def report(results: list[Result], args: argparse.Namespace, notes: list[str]) -> None:
    """The side-by-side table, the cached-token counts and the goals."""
    by_name = {r.name: r for r in results}
    off = by_name.get("off")
    base = off.req_per_s if off else math.nan
    print()
    print(
        f"{args.chats} chat(s) of {args.turns} turns and {args.questions} questions from "
        f"{args.clients} clients per round, {args.rounds} round(s), medians; "
        f"{full_image.WIDTH}x{full_image.HEIGHT} JPEGs, max_tokens {args.max_tokens}, greedy, streamed chat"
    )
    header = (
        f"{'config':10} {'turn-1 TTFT ms':>15} {'turns 2+ TTFT ms (median)':>26} {'follow-up/turn-1':>17} "
        f"{f'{args.questions}q req/s':>10} {'vs caches off':>14} {'prompt tok':>11} "
        f"{'server/other CPU %':>19}"
    )
    print(header)
    for r in results:
        ratio = r.follow_up_ms / r.turn1_ms if r.turn1_ms else math.nan
        tokens = [t.prompt_tokens for c in r.chats for t in c if t.prompt_tokens]
        span = f"{min(tokens)}-{max(tokens)}" if tokens else "-"
        label = {"on": "caches on", "off": "caches off"}.get(r.name, r.name)
        shares = [(c["server"], c["other"]) for c in r.cpu if c]
        cpu = "/".join(f"{statistics.mean(v):.0f}" for v in zip(*shares, strict=True)) if shares else "-"
        print(
            f"{label:10} {_fmt(r.turn1_ms):>15} {_fmt(r.follow_up_ms):>26} {_fmt(ratio, 2):>17} "
            f"{_fmt(r.req_per_s, 2):>10} {_fmt(r.req_per_s / base if base else math.nan, 2):>14} "
            f"{span:>11} {cpu:>19}"
        )
    print()
    for r in results:
        follow = [t.cached_tokens for c in r.chats for t in c[1:]]
        if any(value is not None for value in follow):
            shown = ", ".join("-" if v is None else str(v) for v in follow)
            print(f"  {r.name}: cached_tokens of turns 2+: [{shown}]")
        else:
            print(f"  {r.name}: no usage.prompt_tokens_details.cached_tokens in the answers")
        if r.question_cached:
            print(f"  {r.name}: cached_tokens of the questions: {sorted(r.question_cached)}")
        if any(t.first_from_finish for c in r.chats for t in c):
            print(f"  {r.name}: some answers had no text: their TTFT is the finish chunk's arrival")
    on = by_name.get("on")
    if on and off:
        follow_ratio = on.follow_up_ms / on.turn1_ms if on.turn1_ms else math.nan
        speedup = on.req_per_s / off.req_per_s if off.req_per_s else math.nan
        met = "met" if follow_ratio <= FOLLOW_UP_GOAL else "NOT met"
        print(
            f"  goal: follow-up TTFT <= {FOLLOW_UP_GOAL}x turn 1 with the caches: {follow_ratio:.2f}x, {met}"
        )
        met = "met" if speedup >= THROUGHPUT_GOAL else "NOT met"
        print(f"  goal: {args.questions}q req/s >= {THROUGHPUT_GOAL}x caches off: {speedup:.2f}x, {met}")
    for r in results:
        for error in dict.fromkeys(r.errors):
            print(f"  {r.name} error: {error}")
    for note in notes:
        print(f"  {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--configs", default="on,off,hf", help=f"in order, from {','.join(CONFIGS)}")
    parser.add_argument("--chats", type=int, default=1, help="conversations, each about its own image")
    parser.add_argument("--turns", type=int, default=5, help="turns per conversation")
    parser.add_argument("--questions", type=int, default=24, help="questions about one image")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients asking them")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, each in a rotated order; medians")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    parser.add_argument("--quick", action="store_true", help="1 chat of 3 turns, 8 questions, glmvision only")
    parser.add_argument("--out", type=Path, help="write the raw figures here as JSON")
    parser.add_argument("--logs", type=Path, help="copy the servers' logs into this directory")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="extra setting for the glmvision servers (repeatable), e.g. GLMVISION_TORCH_THREADS=2",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.chats, args.turns, args.questions = 1, 3, 8
        args.configs = ",".join(c for c in args.configs.split(",") if not c.startswith("hf")) or "on,off"
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name in args.config_list:
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    if (
        args.rounds < 1
        or args.chats < 1
        or args.turns < 2
        or args.questions < 1
        or args.clients < 1
        or args.max_tokens < 1
    ):
        parser.error(
            "--rounds, --chats, --questions, --clients and --max-tokens take at least 1, --turns at least 2"
        )
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env takes KEY=VALUE, got {item!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every configuration once; exit 1 when any request failed or a server did not start."""
    args = parse_args(argv)
    missing = load.missing_modules(["glmvision"] + [c for c in args.config_list if c.startswith("hf")])
    if missing:
        print(f"{sys.executable} lacks {', '.join(missing)}: use .venv/bin/python", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, load._raise_interrupt)  # servers are stopped on the way out
    sys.path.insert(0, str(HERE))
    from glmvision.backends.local.demo import build_demo_model

    started = time.monotonic()
    notes = [
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {platform.node()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start",
    ]
    with tempfile.TemporaryDirectory(prefix="gv-caches-") as tmp_name:
        tmp = Path(tmp_name)
        model = build_demo_model(tmp / "demo", full_image_budget=True)
        # Warm-up, one per chat, one for the questions: every workload starts on an image not yet seen.
        images = full_image.make_images(args.chats + 2, seed=23)
        warm, chats, asked = images[0], images[1:-1], images[-1]
        size = len(base64.b64decode(asked)) / 1024
        print(f"demo model (full image budget) and {len(images)} images (~{size:.0f} KiB) ready", flush=True)
        results = [Result(name) for name in args.config_list]
        for round_no in range(args.rounds):
            # Each round starts with the next configuration: the machine's drift spreads over them all.
            shift = round_no % len(results)
            if args.rounds > 1:
                print(f"round {round_no + 1} of {args.rounds}", flush=True)
            for result in results[shift:] + results[:shift]:
                measure(result, warm, chats, asked, model, args, tmp)
    notes.append(
        f"load average {os.getloadavg()[0]:.2f} at end; whole run {time.monotonic() - started:.0f} s"
    )
    report(results, args, notes)
    if args.out:
        raw = {
            "settings": {k: str(v) for k, v in vars(args).items()},
            "results": [asdict(r) for r in results],
        }
        args.out.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
