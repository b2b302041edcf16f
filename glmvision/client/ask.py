"""`glmvision ask IMAGE_OR_URL "question"`: one answer from a running server, streamed to the terminal."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from glmvision.client.http import (
    ClientError,
    Server,
    add_server_arguments,
    chat_body,
    is_http_or_data_url,
    post,
    sse_payloads,
)

PATH = "/v1/chat/completions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "image", metavar="IMAGE_OR_URL", help="an image file, or an http(s) URL the server fetches"
    )
    parser.add_argument("question", help="what to ask about the image")
    add_server_arguments(parser)
    parser.add_argument(
        "--no-stream", action="store_true", help="wait for the whole answer instead of streaming it"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object: answer, reasoning, usage, latency"
    )
    parser.add_argument(
        "--think", action="store_true", help="let the model think first; its reasoning goes to stderr"
    )
    parser.add_argument(
        "--boxes", metavar="OUT.png", help="draw the answer's grounding boxes over the image into this file"
    )


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Ask, print, and return the exit code: 0 answered, 1 the server or connection failed, 2 bad usage."""
    if args.boxes and is_http_or_data_url(args.image):
        print("glmvision ask: --boxes needs a local image file to draw on", file=err)
        return 2
    try:
        server = Server.from_args(args.server, args.key, args.timeout)
        body = chat_body(
            args.image,
            args.question,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            chat_template_kwargs={"enable_thinking": bool(args.think)},
        )
        stream = not args.no_stream and not args.json
        started = time.perf_counter()
        answer = _streamed(server, body, out, err) if stream else _whole(server, body)
    except ClientError as failure:
        status = f" (HTTP {failure.status}, {failure.code})" if failure.status else ""
        print(f"glmvision ask: {failure.message}{status}", file=err)
        return 2 if failure.code in ("usage", "file_not_found", "file_unreadable") else 1
    except KeyboardInterrupt:
        print("", file=err)
        return 130
    answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    if args.boxes:
        _draw(args.image, answer.get("boxes") or [], args.boxes, err)
    if args.json:
        print(json.dumps(answer, ensure_ascii=False), file=out)
    elif not stream:
        if answer["reasoning"]:
            print(answer["reasoning"], file=err)
        print(answer["answer"], file=out)
    return 0


def _whole(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    completion = post(server, PATH, {**body, "stream": False}).json()
    choice = completion["choices"][0]
    return {
        "answer": choice["message"].get("content") or "",
        "reasoning": choice["message"].get("reasoning_content"),
        "finish_reason": choice.get("finish_reason"),
        "usage": completion.get("usage"),
        "model": completion.get("model"),
        "boxes": choice["message"].get("boxes") or [],
    }


def _streamed(server: Server, body: dict[str, Any], out: TextIO, err: TextIO) -> dict[str, Any]:
    """Print content to `out` (reasoning to `err`) as it arrives; the whole answer at the end."""
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    answer: dict[str, Any] = {
        "answer": "",
        "reasoning": None,
        "finish_reason": None,
        "usage": None,
        "boxes": [],
    }
    for payload in sse_payloads(post(server, PATH, request, stream=True)):
        answer["model"] = payload.get("model")
        answer["usage"] = payload.get("usage") or answer["usage"]
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") or {}
            answer["boxes"] = delta.get("boxes") or answer["boxes"]  # in the finish chunk
            if delta.get("reasoning_content"):
                answer["reasoning"] = (answer["reasoning"] or "") + delta["reasoning_content"]
                err.write(delta["reasoning_content"])
                err.flush()
            if delta.get("content"):
                answer["answer"] += delta["content"]
                out.write(delta["content"])
                out.flush()
            answer["finish_reason"] = choice.get("finish_reason") or answer["finish_reason"]
    if answer["reasoning"]:
        err.write("\n")
    out.write("\n")
    return answer


def _draw(image: str, boxes: list[dict[str, Any]], out: str, err: TextIO) -> None:
    from glmvision.client.draw import draw_boxes

    if not boxes:
        print("no grounding boxes in the answer: nothing drawn", file=err)
        return
    drawn = draw_boxes(image, boxes, out)
    print(f"{drawn} box{'es' if drawn != 1 else ''} drawn -> {out}", file=err)
