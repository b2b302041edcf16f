"""The browser page, driven in real headless Chromium (Debian's, through Playwright) against real gunicorn."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, LiveServer, image_bytes, live_server, make_video, server_env
from PIL import Image

SCREENSHOT = ROOT / "tests" / "data" / "screenshot.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "page-key"
WAIT_MS = 60_000
# Flags for a closed network: no background connections, no first-run work.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

try:
    from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
except ImportError:  # pragma: no cover - CI installs it (requirements-dev.txt)
    sync_playwright = None

if sync_playwright is None or not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the page tests: Playwright and Debian's chromium are missing")
    pytest.skip(
        "Playwright or /usr/bin/chromium is not installed (.ci/run installs both)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    yield opened
    context.close()


def start_server(
    factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path, name: str, **settings: str
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir, **settings)
    with live_server(factory.mktemp(name), env, ready_path="/readyz") as server:
        yield server


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[LiveServer]:
    yield from start_server(tmp_path_factory, demo_model_dir, runtime_dir, "page", DEFAULT_MAX_NEW_TOKENS="8")


def open_page(page: Page, server: LiveServer) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='true']")


def ask(page: Page, question: str, image: Path | None = None) -> None:
    if image is not None:
        page.set_input_files("#file-input", str(image))
        expect(page.locator("#preview")).to_be_visible()
    page.fill("#question", question)
    page.press("#question", "Enter")


def wait_answers(page: Page, count: int) -> None:
    """Until `count` answers have finished (their token counts shown)."""
    page.wait_for_function(
        "n => [...document.querySelectorAll('.message.assistant .meta')]"
        ".filter(m => m.textContent.includes('tokens')).length >= n",
        arg=count,
    )


def fulfil_stream(route: Route, chunks: list[dict[str, Any]]) -> None:
    """Answer the page's request with these chunks, as the server streams them."""
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)


def canned(route: Route, answer: str) -> None:
    """A stand-in for the model: the answer as the server would stream it."""
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": answer}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}},
    ]
    fulfil_stream(route, chunks)


def test_the_page_is_served_with_strict_headers(page: Page, server: LiveServer) -> None:
    response = page.goto(server.url + "/")
    assert response is not None and response.status == 200
    headers = response.headers
    policy = headers["content-security-policy"]
    assert (
        "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    )
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    script = page.request.get(server.url + "/static/page.js")
    assert script.status == 200 and "content-security-policy" in script.headers
    assert page.locator("script:not([src])").count() == 0  # no inline script at all


def test_upload_ask_stream_follow_up_and_find_it_in_history(page: Page, server: LiveServer) -> None:
    sent: list[dict[str, Any]] = []
    streamed: list[str] = []
    problems: list[str] = []  # console errors: a CSP violation, a missing file, a script error
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None
    )
    page.on(
        "response",
        lambda r: (
            streamed.append(r.headers.get("content-type", ""))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    open_page(page, server)
    expect(page.locator("#status")).to_contain_text("ready")
    expect(page.locator("#demo-banner")).to_be_visible()  # the demo model is served
    expect(page.locator("#key-row")).to_be_hidden()  # this server has no keys
    ask(page, "What does the dashboard show?", SCREENSHOT)
    wait_answers(page, 1)
    assert streamed and streamed[0].startswith("text/event-stream")
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}
    first = sent[0]["messages"]
    assert len(first) == 1 and first[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    expect(page.locator(".message.assistant .meta").first).to_contain_text("answer tokens")

    ask(page, "And the lowest bar?")
    wait_answers(page, 2)
    follow_up = sent[1]["messages"]
    assert [m["role"] for m in follow_up] == ["user", "assistant", "user"]
    assert follow_up[0] == first[0]  # the image stays in the conversation
    assert follow_up[2]["content"] == [{"type": "text", "text": "And the lowest bar?"}]
    shown = page.locator(".message.assistant .answer").first.text_content()
    assert follow_up[1]["content"].replace("<|begin_of_box|>", "").replace("<|end_of_box|>", "") == shown
    assert problems == []

    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    item = page.locator("#conversations li").first
    expect(item.locator(".open")).to_have_text("What does the dashboard show?")
    expect(page.locator(".message")).to_have_count(4)  # reopened as it was

    item.locator(".rename").click()
    page.fill("#conversations li input", "Dashboard check")
    page.press("#conversations li input", "Enter")
    expect(page.locator("#conversations li .open").first).to_have_text("Dashboard check")
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator("#conversations li .open").first).to_have_text("Dashboard check")

    page.on("dialog", lambda dialog: dialog.accept())
    page.locator("#conversations li .delete").first.click()
    expect(page.locator("#conversations li")).to_have_count(0)
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator("#conversations li")).to_have_count(0)


def test_an_empty_page_says_what_to_do_and_the_sample_can_be_asked_about(
    page: Page, server: LiveServer
) -> None:
    sent: list[dict[str, Any]] = []
    page.on(
        "request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None
    )
    page.route("**/v1/chat/completions", lambda route: canned(route, "Tuesday."))
    open_page(page, server)
    hint = page.locator("#empty-hint")
    expect(hint).to_be_visible()
    expect(hint).to_contain_text("Drop an image")
    page.click("text=Try the sample")
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#question")).to_have_value("Which day has the tallest bar?")
    page.press("#question", "Enter")
    wait_answers(page, 1)
    expect(hint).to_have_count(0)
    expect(page.locator(".message.assistant .answer")).to_have_text("Tuesday.")
    (image,) = [part for part in sent[0]["messages"][-1]["content"] if part["type"] == "image_url"]
    assert image["image_url"]["url"].startswith("data:image/")
    page.click("#new-chat")  # a new, empty conversation shows the hint again
    expect(page.locator("#empty-hint")).to_be_visible()


def test_a_script_in_the_answer_is_shown_as_text(page: Page, server: LiveServer) -> None:
    hostile = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"><b>bold</b>'
    page.route("**/v1/chat/completions", lambda route: canned(route, hostile))
    open_page(page, server)
    ask(page, "Say something nasty.", SCREENSHOT)
    wait_answers(page, 1)
    answer = page.locator(".message.assistant .answer")
    expect(answer).to_have_text(hostile)
    assert answer.locator("script, img, b").count() == 0
    assert page.evaluate("window.pwned") is None


def test_boxes_in_the_answer_are_drawn_over_the_image(page: Page, server: LiveServer, tmp_path: Path) -> None:
    white = tmp_path / "white.png"
    Image.new("RGB", (400, 300), (255, 255, 255)).save(white)
    answer = (
        "The panel is at <|begin_of_box|>[[100,200,500,600]]<|end_of_box|>, "
        'and {"bbox_2d": [600, 100, 900, 400], "label": "logo"}; '
        "the buttons, as the server sends boxes (markers taken out): [[10,800,50,900], [60,800,90,900]]."
    )
    page.route("**/v1/chat/completions", lambda route: canned(route, answer))
    open_page(page, server)
    ask(page, "Where is the panel?", white)
    wait_answers(page, 1)
    figure = page.locator(".message.assistant .boxes")
    expect(figure).to_have_attribute("data-drawn", "true")
    expect(figure).to_have_attribute("data-count", "4")
    expect(figure.locator("li")).to_have_text(
        [
            "box 1: [100, 200, 500, 600]",
            "box 2: [10, 800, 50, 900]",
            "box 3: [60, 800, 90, 900]",
            "logo: [600, 100, 900, 400]",
        ]
    )
    expect(page.locator(".message.assistant .answer")).not_to_contain_text("begin_of_box")
    # The first box's left edge, 10% across, half-way down it: the first colour; its inside stays white.
    pixels = page.evaluate(
        """() => {
            const canvas = document.querySelector('.boxes canvas');
            const at = (x, y) => [...canvas.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3)];
            return {size: [canvas.width, canvas.height], edge: at(40, 120), inside: at(120, 120)};
        }"""
    )
    assert pixels["size"] == [400, 300]
    assert pixels["edge"] == [224, 49, 49] and pixels["inside"] == [255, 255, 255]


def test_on_a_keyed_server_the_key_field_is_used_and_kept(
    page: Page, tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> None:
    for keyed in start_server(
        tmp_path_factory, demo_model_dir, runtime_dir, "keyed", API_KEYS=KEY, DEFAULT_MAX_NEW_TOKENS="4"
    ):
        open_page(page, keyed)
        expect(page.locator("#key-row")).to_be_visible()
        ask(page, "Hello?", SCREENSHOT)
        expect(page.locator("#error")).to_contain_text("This server needs an API key")
        page.fill("#api-key", KEY)
        page.locator("#send").click()  # the question stays in the box after a failure
        wait_answers(page, 1)
        expect(page.locator("#error")).to_be_hidden()
        page.reload()
        page.wait_for_selector("body[data-ready='true']")
        expect(page.locator("#api-key")).to_have_value(KEY)


def test_errors_and_stop_in_words(
    page: Page,
    tmp_path_factory: pytest.TempPathFactory,
    demo_model_dir: Path,
    runtime_dir: Path,
    tmp_path: Path,
) -> None:
    small = tmp_path / "small.png"
    small.write_bytes(image_bytes(64, 48))
    for strict in start_server(
        tmp_path_factory,
        demo_model_dir,
        runtime_dir,
        "strict",
        MAX_IMAGE_PIXELS="10000",
        DEFAULT_MAX_NEW_TOKENS="2048",
    ):
        open_page(page, strict)
        ask(page, "Too big?", SCREENSHOT)  # 480 x 270 pixels, over the 10,000 allowed
        expect(page.locator("#error")).to_contain_text("too large for this server")
        expect(page.locator("#error")).to_contain_text("10,000 pixels")

        page.fill("#question", "")

        def long_answer(route: Route) -> None:
            # The random model may draw a stop token any time: min_tokens keeps it talking until stopped.
            body = {**json.loads(route.request.post_data or "{}"), "min_tokens": 2048}
            route.continue_(post_data=json.dumps(body))

        page.route("**/v1/chat/completions", long_answer)
        ask(page, "Talk for a long time.", small)
        page.wait_for_function(
            "() => (document.querySelector('.message.assistant:last-of-type .answer') || {}).textContent"
        )
        page.locator("#stop").click()
        expect(page.locator(".message.assistant .meta").last).to_contain_text("stopped")
        expect(page.locator("#send")).to_be_enabled()
        page.unroute("**/v1/chat/completions", long_answer)

        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(
                status=429,
                headers={"Retry-After": "7", "Content-Type": "application/json"},
                body=json.dumps({"error": {"message": "Rate limit exceeded", "code": "rate_limit_exceeded"}}),
            ),
        )
        ask(page, "Again?")
        expect(page.locator("#error")).to_have_text("Too many requests for now. Retry in 7 s.")


def test_usable_on_a_phone_width_screen_and_by_keyboard(browser: Browser, server: LiveServer) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 800})
    phone = context.new_page()
    try:
        open_page(phone, server)
        history = phone.locator(".history").bounding_box()
        chat = phone.locator(".chat").bounding_box()
        assert (
            history and chat and history["y"] < chat["y"] and chat["width"] <= 390
        )  # stacked, not side by side
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
        phone.focus("#question")
        phone.keyboard.press("Shift+Tab")
        assert phone.evaluate("document.activeElement.id") in ("clear-image", "file-input", "drop-zone")
    finally:
        context.close()


def test_large_images_are_downscaled_in_the_browser_to_the_servers_side(
    page: Page,
    tmp_path_factory: pytest.TempPathFactory,
    demo_model_dir: Path,
    runtime_dir: Path,
    tmp_path: Path,
) -> None:
    wide = tmp_path / "wide.png"
    wide.write_bytes(image_bytes(600, 300))
    sent: list[dict[str, Any]] = []
    page.on(
        "request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None
    )
    for small in start_server(
        tmp_path_factory,
        demo_model_dir,
        runtime_dir,
        "side",
        MAX_IMAGE_SIDE="256",
        DEFAULT_MAX_NEW_TOKENS="2",
    ):
        open_page(page, small)
        ask(page, "How wide?", wide)
        wait_answers(page, 1)
    url = sent[0]["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    uploaded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert uploaded.size == (256, 128)


def test_an_image_can_be_dropped_or_pasted(page: Page, server: LiveServer) -> None:
    open_page(page, server)
    script = """([kind, data]) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'shot.png', {type: 'image/png'}));
        if (kind === 'drop') {
            document.querySelector('#drop-zone').dispatchEvent(
                new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        } else {
            const init = {clipboardData: transfer, bubbles: true, cancelable: true};
            document.dispatchEvent(new ClipboardEvent('paste', init));
        }
    }"""
    data = base64.b64encode(SCREENSHOT.read_bytes()).decode()
    for kind in ("drop", "paste"):
        page.evaluate(script, [kind, data])
        expect(page.locator("#preview")).to_be_visible()
        assert (
            page.locator("#preview").get_attribute("src") == "data:image/png;base64," + data
        )  # bytes as given
        page.locator("#clear-image").click()
        expect(page.locator("#preview")).to_be_hidden()


def test_thinking_is_sent_and_its_reasoning_shown_collapsed_apart(page: Page, server: LiveServer) -> None:
    sent: list[dict[str, Any]] = []

    def answer_with_reasoning(route: Route) -> None:
        sent.append(route.request.post_data_json)
        chunks = [
            {
                "choices": [
                    {"index": 0, "delta": {"reasoning_content": "Look at the bars."}, "finish_reason": None}
                ]
            },
            {"choices": [{"index": 0, "delta": {"content": "Wednesday."}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}},
        ]
        fulfil_stream(route, chunks)

    page.route("**/v1/chat/completions", answer_with_reasoning)
    open_page(page, server)
    page.check("#thinking")
    ask(page, "Which is lowest?", SCREENSHOT)
    wait_answers(page, 1)
    assert sent[0]["chat_template_kwargs"] == {"enable_thinking": True}
    reasoning = page.locator(".message.assistant details.reasoning")
    expect(reasoning).to_be_visible()
    assert reasoning.get_attribute("open") is None  # collapsed until opened
    expect(reasoning.locator("pre")).to_have_text("Look at the bars.")
    expect(page.locator(".message.assistant .answer")).to_have_text("Wednesday.")


def test_the_servers_boxes_are_drawn_when_it_sends_them(page: Page, server: LiveServer) -> None:
    def boxed(route: Route) -> None:
        finish_box = {"image": 0, "box": [0, 0, 500, 500], "pixels": [0, 0, 240, 135], "label": "chart"}
        chunks = [
            {"choices": [{"index": 0, "delta": {"content": "Top left."}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"boxes": [finish_box]}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}},
        ]
        fulfil_stream(route, chunks)

    page.route("**/v1/chat/completions", boxed)
    open_page(page, server)
    ask(page, "Where is the chart?", SCREENSHOT)
    wait_answers(page, 1)
    figure = page.locator(".message.assistant .boxes")
    expect(figure).to_have_attribute("data-drawn", "true")
    expect(figure.locator("li")).to_have_text(["chart: [0, 0, 500, 500]"])
    page.reload()  # kept with the conversation
    page.wait_for_selector("body[data-ready='true']")
    expect(page.locator(".message.assistant .boxes li")).to_have_text(["chart: [0, 0, 500, 500]"])


def test_a_video_is_previewed_sent_and_answered(page: Page, server: LiveServer, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_video("mp4"))
    sent: list[dict[str, Any]] = []
    problems: list[str] = []  # a CSP violation (the preview's data: URL), a script error
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None
    )
    open_page(page, server)
    page.set_input_files("#file-input", str(clip))
    preview = page.locator("#video-preview")
    expect(preview).to_be_visible()
    assert preview.evaluate("video => video.muted && video.controls")
    expect(page.locator("#preview")).to_be_hidden()
    expect(page.locator("#clear-image")).to_have_text("Remove video")
    page.fill("#question", "What happens in the clip?")
    page.press("#question", "Enter")
    wait_answers(page, 1)  # the demo model's answer, its usage shown
    expect(page.locator("#error")).to_be_hidden()
    expect(preview).to_be_hidden()
    parts = sent[0]["messages"][0]["content"]
    assert [part["type"] for part in parts] == ["video_url", "text"]
    assert (
        parts[0]["video_url"]["url"]
        == "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    )
    expect(page.locator(".message.user video.thumb")).to_have_count(1)
    assert problems == []


def test_a_video_over_the_cap_is_refused_in_the_browser_and_the_servers_refusal_shown(
    page: Page,
    tmp_path_factory: pytest.TempPathFactory,
    demo_model_dir: Path,
    runtime_dir: Path,
    tmp_path: Path,
) -> None:
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.url.endswith("/v1/chat/completions") else None)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_video("mp4"))  # 6 frames: a few KB, over the server's 2 frames
    for capped in start_server(
        tmp_path_factory, demo_model_dir, runtime_dir, "video-cap", MAX_VIDEO_MB="0.05", MAX_VIDEO_FRAMES="2"
    ):
        open_page(page, capped)
        big = {"name": "big.webm", "mimeType": "video/webm", "buffer": b"\0" * 100_000}
        page.set_input_files("#file-input", files=[big])
        expect(page.locator("#error")).to_have_text(
            "The video is 98 KB; this server takes videos up to 52 KB. Send a shorter or smaller one."
        )
        expect(page.locator("#video-preview")).to_be_hidden()

        ask_about = page.locator("#question")
        page.set_input_files("#file-input", str(clip))
        expect(page.locator("#video-preview")).to_be_visible()
        expect(page.locator("#error")).to_be_hidden()
        ask_about.fill("What happens?")
        ask_about.press("Enter")
        expect(page.locator("#error")).to_have_text(
            "The video has 6 frames; at most 2 are decoded. (HTTP 400, video_too_large)"
        )
        expect(page.locator("#video-preview")).to_be_visible()  # back in the form, to send again
        expect(ask_about).to_have_value("What happens?")
    assert len(sent) == 1  # the oversized file never left the browser
