"""`glmvision batch DIR_OR_GLOB --prompt ... --out results.jsonl`: one question over many images.

One JSON line per image (path, answer, usage, latency, error), written as each answer comes, so an
interrupted run leaves a valid file; a second run skips the images already answered there and
tries the failed ones again. Exit status: 0 every image answered; 1 some failed (their lines
say why); 2 bad usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from glmvision.client.http import ClientError, Server, add_server_arguments, chat_body, post, with_retries

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
PATH = "/v1/chat/completions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images",
        metavar="DIR_OR_GLOB",
        help="a folder (searched recursively) or a glob such as 'shots/*.png'",
    )
    parser.add_argument("--prompt", required=True, help="the question asked of every image")
    parser.add_argument(
        "--out", required=True, metavar="results.jsonl", help="JSON lines output; an existing file is resumed"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, metavar="N", help="requests in flight at once (default 4)"
    )
    add_server_arguments(parser)
    parser.add_argument(
        "--retries",
        type=int,
        default=5,
        metavar="N",
        help="tries again after 429/503, honouring Retry-After (default 5)",
    )


def find_images(spec: str) -> list[str]:
    """The image files a folder holds (recursively), or that a glob matches, sorted."""
    if os.path.isdir(spec):
        found = (str(path) for path in Path(spec).rglob("*") if path.is_file())
    else:
        found = (path for path in glob.glob(spec, recursive=True) if os.path.isfile(path))
    return sorted(path for path in found if Path(path).suffix.lower() in IMAGE_SUFFIXES)


def answered(out: Path) -> set[str]:
    """The paths the output already answers. Failed or half-written lines are dropped from it (they
    are tried again), rewriting the file atomically if there were any."""
    if not out.exists():
        return set()
    kept: list[str] = []
    done: set[str] = set()
    dropped = 0
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            ok = (
                isinstance(record, dict)
                and record.get("error") is None
                and isinstance(record.get("path"), str)
            )
        except ValueError:
            ok = False
        if ok and record["path"] not in done:
            kept.append(line)
            done.add(record["path"])
        else:
            dropped += 1
    if dropped:
        temporary = out.with_name(out.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(temporary, out)
    return done


def ask_one(server: Server, path: str, args: argparse.Namespace) -> dict[str, Any]:
    """One image's line: its answer and usage, or its error; the latency either way."""
    started = time.perf_counter()
    record: dict[str, Any] = {"path": path, "answer": None, "usage": None, "latency_ms": None, "error": None}
    try:
        body = chat_body(path, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature)
        completion = with_retries(lambda: post(server, PATH, body).json(), args.retries)
        record["answer"] = completion["choices"][0]["message"].get("content") or ""
        record["usage"] = completion.get("usage")
    except ClientError as failure:
        record["error"] = failure.as_dict()
    except (ValueError, KeyError, IndexError, TypeError):
        record["error"] = ClientError("the server's answer was not a chat completion", "bad_answer").as_dict()
    record["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return record


def run(args: argparse.Namespace, err: TextIO = sys.stderr) -> int:
    """Answer every image not yet in the output. Exit 0: all answered; 1: some failed; 2: bad usage;
    130: interrupted (the file stays valid: run again to resume)."""
    from tqdm import tqdm

    try:
        server = Server.from_args(args.server, args.key, args.timeout)
    except ClientError as failure:
        print(f"glmvision batch: {failure.message}", file=err)
        return 2
    if args.concurrency < 1:
        print("glmvision batch: --concurrency must be at least 1", file=err)
        return 2
    images = find_images(args.images)
    if not images:
        print(f"glmvision batch: no images found at {args.images}", file=err)
        return 2
    out = Path(args.out)
    done = answered(out)
    todo = [path for path in images if path not in done]
    if done:
        print(f"resuming: {len(images) - len(todo)} of {len(images)} already in {out}", file=err)
    work: queue.Queue[str] = queue.Queue()
    for path in todo:
        work.put(path)
    results: queue.Queue[dict[str, Any]] = queue.Queue()

    def worker() -> None:
        while True:
            try:
                path = work.get_nowait()
            except queue.Empty:
                return
            results.put(ask_one(server, path, args))

    # Daemon threads: on Ctrl-C the process leaves at once instead of waiting out requests in flight.
    for _ in range(min(args.concurrency, len(todo))):
        threading.Thread(target=worker, daemon=True).start()
    failed = 0
    written = 0
    try:
        with out.open("a", encoding="utf-8") as sink, tqdm(total=len(todo), unit="img", file=err) as bar:
            while written < len(todo):
                try:
                    record = results.get(timeout=0.5)  # wakes up for Ctrl-C
                except queue.Empty:
                    continue
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")  # one write per line
                sink.flush()
                written += 1
                if record["error"] is not None:
                    failed += 1
                    bar.write(f"{record['path']}: {record['error']['message']}")
                bar.update(1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {written} of {len(todo)} written to {out}; run again to resume", file=err)
        return 130
    print(f"{len(todo) - failed} answered, {failed} failed, {len(done)} already done -> {out}", file=err)
    return 1 if failed else 0
