#!/usr/bin/env python3
"""Screenshots of the browser page's main states into docs/ (for the README).

`.venv/bin/python scripts/screenshots.py` serves the demo model with gunicorn on a free loopback
port and drives the page in Debian's chromium (Playwright, as tests/test_page.py does). The boxes
shot answers through a canned stream, since the demo model's words are noise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from playwright.sync_api import Route, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCREENSHOT = ROOT / "tests" / "data" / "screenshot.png"
ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
BOXED = (
    "The lowest bar is Wednesday's <|begin_of_box|>[[500,590,627,928]]<|end_of_box|>, and the title is "
    'at {"bbox_2d": [20, 30, 230, 100], "label": "title"}.'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def canned(route: Route) -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": BOXED}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 431, "completion_tokens": 38, "total_tokens": 469}},
    ]
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)


def main() -> int:
    DOCS.mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="glmvision-shots-") as temp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
        env.update(
            GLMVISION_BIND=f"127.0.0.1:{port}",
            GLMVISION_DEMO_CACHE=str(Path(temp) / "demo"),
            GLMVISION_DEFAULT_MAX_NEW_TOKENS="24",
            HF_HUB_OFFLINE="1",
        )
        command = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"]
        server = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if requests.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    print("the server did not come up", file=sys.stderr)
                    return 1
                time.sleep(0.3)
            shoot(url)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


def shoot(url: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        context = browser.new_context(viewport={"width": 1200, "height": 860})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='true']")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('ready')")
        page.set_input_files("#file-input", str(SCREENSHOT))
        page.fill("#question", "Which day has the lowest bar?")
        page.press("#question", "Enter")
        page.wait_for_function(
            "() => document.querySelector('.message.assistant .meta').textContent.includes('tokens')"
        )
        page.route("**/v1/chat/completions", canned)
        page.fill("#question", "Where is it? Answer with its box.")
        page.press("#question", "Enter")
        page.wait_for_selector(".boxes[data-drawn='true']")
        page.evaluate("document.querySelector('#messages').scrollTop = 1e6")
        page.screenshot(path=str(DOCS / "page.png"))
        page.unroute("**/v1/chat/completions")

        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(
                status=429,
                headers={"Retry-After": "7", "Content-Type": "application/json"},
                body=json.dumps({"error": {"message": "Rate limit exceeded", "code": "rate_limit_exceeded"}}),
            ),
        )
        page.fill("#question", "And Friday?")
        page.press("#question", "Enter")
        page.wait_for_selector("#error:not([hidden])")
        page.screenshot(path=str(DOCS / "page-error.png"))

        phone = context.new_page()  # the same browser profile: the conversation is in its history
        phone.set_viewport_size({"width": 390, "height": 780})
        phone.goto(url + "/")
        phone.wait_for_selector("body[data-ready='true']")
        phone.wait_for_selector(".message.assistant")
        phone.screenshot(path=str(DOCS / "page-phone.png"))
        browser.close()
    for name in ("page.png", "page-error.png", "page-phone.png"):
        print(DOCS / name)


if __name__ == "__main__":
    raise SystemExit(main())
