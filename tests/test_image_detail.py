"""Per-image pixel budgets: OpenAI's image_url.detail and min_pixels/max_pixels, on both routes, on the
demo model with GLM-4.6V-Flash's own pixel limits (`--full-image-budget`)."""

from __future__ import annotations

import base64
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from transformers import AutoProcessor

from glmvision import create_app
from glmvision.backends.local.demo import build_demo_model
from glmvision.backends.upstream.client import openai_messages
from glmvision.core.images import LOW_DETAIL_PIXELS, DecodedImage, PixelBudget
from glmvision.serving.pipeline import Turn, to_messages

VISION = "/v1/chat/vision"
CHAT = "/v1/chat/completions"
# GLM-4.6V-Flash's processor limits count a still image twice (temporal patch 2): in pixels of the
# image itself (width x height) the server takes 12,544 / 2 to 9,633,792 / 2.
LEAST, MOST = 6_272, 4_816_896
TOKEN = 28 * 28  # pixels per visual token


@pytest.fixture(scope="module")
def full_budget_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with GLM-4.6V-Flash's own pixel limits."""
    return build_demo_model(tmp_path_factory.mktemp("full-budget"), full_image_budget=True)


@pytest.fixture(scope="module")
def app(full_budget_dir: Path) -> Flask:
    app = create_app({"GLMVISION_MODEL": str(full_budget_dir), "GLMVISION_DEVICE": "cpu"})
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as test_client:
        yield test_client


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, seeded RGB picture (so a lossless re-encoding keeps it perceptually the same)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(float)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 5) / width, rng.uniform(1, 5) / height, rng.uniform(0, 6.3)
        channels.append(128 + 100 * np.sin(x * fx * 6.3 + phase) * np.cos(y * fy * 6.3 + phase / 2))
    return Image.fromarray(np.stack(channels, -1).clip(0, 255).astype(np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str = "PNG", **options: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


LARGE = encoded(picture(1280, 960), "JPEG", quality=90)


def rule(width: int, height: int, least: int = LEAST, most: int = MOST) -> list[int]:
    """[width, height] the GLM-V processor's own smart_resize gives, with these per-image bounds."""
    from transformers.models.glm4v import image_processing_glm4v

    new_height, new_width = image_processing_glm4v.smart_resize(
        num_frames=2, height=height, width=width, temporal_factor=2, factor=28, min_pixels=2 * least,
        max_pixels=2 * most,
    )  # fmt: skip
    return [int(new_width), int(new_height)]


def metric(client: FlaskClient, name: str) -> float:
    """The value of one unlabelled series in /metrics (0 when absent)."""
    text = client.get("/metrics").get_data(as_text=True)
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def vision(client: FlaskClient, **fields: Any) -> tuple[dict[str, Any], float]:
    """A /v1/chat/vision answer (200 asserted) and the visual tokens its prompt held (sampled by
    default, so never from the cache)."""
    before = metric(client, "glmvision_visual_tokens_total")
    body = {"image": LARGE, "prompt": "What is this?", "max_new_tokens": 1, **fields}
    response = client.post(VISION, json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json(), metric(client, "glmvision_visual_tokens_total") - before


def image_part(url: str, **fields: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **fields}}


def chat_body(*images: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "text", "text": "Compare these."}, *images]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 1}


def error_of(response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.get_json()
    return response.get_json()["error"]


# The model sees each image at the size its detail asks for.


def test_native_detail_sets_the_size_the_model_sees(client: FlaskClient) -> None:
    """low: at most 256 visual tokens; high and auto: the processor's own maximum, as with no detail."""
    low, low_tokens = vision(client, detail="low")
    high, high_tokens = vision(client, detail="high")
    auto, _ = vision(client, detail="auto")
    plain, plain_tokens = vision(client)

    assert low["image"] == {
        "width": 1280,
        "height": 960,
        "resized_to": rule(1280, 960, most=LOW_DETAIL_PIXELS),
    }
    width, height = low["image"]["resized_to"]
    assert width % 28 == 0 and height % 28 == 0 and width * height <= LOW_DETAIL_PIXELS
    assert low_tokens == width * height // TOKEN <= 256
    assert high["image"]["resized_to"] == auto["image"]["resized_to"] == plain["image"]["resized_to"]
    assert high["image"]["resized_to"] == rule(1280, 960)
    assert high_tokens == plain_tokens == 1288 * 952 // TOKEN
    assert low_tokens < high_tokens
    assert low["usage"]["prompt_tokens"] == high["usage"]["prompt_tokens"] - high_tokens + low_tokens


def test_openai_detail_is_per_image(client: FlaskClient) -> None:
    """Two images in one message, one low and one high: each gets its own size."""
    url = "data:image/jpeg;base64," + LARGE
    before = metric(client, "glmvision_visual_tokens_total")
    response = client.post(
        CHAT, json=chat_body(image_part(url, detail="low"), image_part(url, detail="high"))
    )
    assert response.status_code == 200, response.get_json()
    both = metric(client, "glmvision_visual_tokens_total") - before
    low, high = rule(1280, 960, most=LOW_DETAIL_PIXELS), rule(1280, 960)
    assert both == (low[0] * low[1] + high[0] * high[1]) // TOKEN

    before = metric(client, "glmvision_visual_tokens_total")
    response = client.post(CHAT, json=chat_body(image_part(url, detail="low")))
    assert response.status_code == 200, response.get_json()
    alone = metric(client, "glmvision_visual_tokens_total") - before
    assert alone == low[0] * low[1] // TOKEN <= 256


def test_the_openai_client_sends_detail_and_pixel_bounds(app: Flask) -> None:
    """openai.OpenAI's own request shape, min_pixels/max_pixels beside detail in image_url."""
    transport = httpx.Client(transport=httpx.WSGITransport(app=app))
    oai = openai.OpenAI(base_url="http://test/v1", api_key="unused", max_retries=0, http_client=transport)
    url = "data:image/jpeg;base64," + LARGE
    low = oai.chat.completions.create(
        model="glm-4.6v-flash-demo",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, image_part(url, detail="low")]}
        ],
        max_tokens=1,
    )
    bounded = oai.chat.completions.create(
        model="glm-4.6v-flash-demo",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi"}, image_part(url, detail="low", max_pixels=60_000)],
            }
        ],
        max_tokens=1,
    )
    assert low.usage is not None and bounded.usage is not None
    width, height = rule(1280, 960, most=60_000)
    low_width, low_height = rule(1280, 960, most=LOW_DETAIL_PIXELS)
    fewer = (low_width * low_height - width * height) // TOKEN
    assert fewer > 0
    assert bounded.usage.prompt_tokens == low.usage.prompt_tokens - fewer
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model="glm-4.6v-flash-demo",
            messages=[{"role": "user", "content": [image_part(url, max_pixels=MOST + 1)]}],
            max_tokens=1,
        )
    assert refused.value.code == "invalid_value"
    assert refused.value.param == "messages.0.content.0.image_url.max_pixels"


# Explicit bounds.


def test_max_pixels_and_min_pixels_bound_the_image(client: FlaskClient) -> None:
    """max_pixels shrinks a large image, min_pixels enlarges a small one, both on the processor's grid."""
    small, _ = vision(client, max_pixels=100_000)
    assert small["image"]["resized_to"] == rule(1280, 960, most=100_000)
    width, height = small["image"]["resized_to"]
    assert width * height <= 100_000 and width % 28 == 0 and height % 28 == 0

    tiny = encoded(picture(64, 48))
    plain, _ = vision(client, image=tiny)
    grown, tokens = vision(client, image=tiny, min_pixels=200_000)
    assert plain["image"]["resized_to"] == rule(64, 48)
    assert grown["image"]["resized_to"] == rule(64, 48, least=200_000)
    width, height = grown["image"]["resized_to"]
    assert width * height >= 200_000 and tokens == width * height // TOKEN


def test_explicit_pixels_win_over_detail(client: FlaskClient) -> None:
    """detail low with max_pixels 1,000,000: the number decides; detail high with 100,000 likewise."""
    larger, _ = vision(client, detail="low", max_pixels=1_000_000)
    assert larger["image"]["resized_to"] == rule(1280, 960, most=1_000_000)
    width, height = larger["image"]["resized_to"]
    assert LOW_DETAIL_PIXELS < width * height <= 1_000_000
    smaller, _ = vision(client, detail="high", max_pixels=100_000)
    assert smaller["image"]["resized_to"] == rule(1280, 960, most=100_000)
    raised, _ = vision(client, detail="low", min_pixels=400_000)  # a floor over low's cap lifts the cap
    assert raised["image"]["resized_to"] == rule(1280, 960, least=400_000, most=400_000)


# Refusals: a stable code and the exact field.


@pytest.mark.parametrize(
    ("fields", "code", "param", "words"),
    [
        ({"max_pixels": MOST + 1}, "invalid_value", "max_pixels", "6,272 to 4,816,896"),
        ({"min_pixels": LEAST - 1}, "invalid_value", "min_pixels", "6,272 to 4,816,896"),
        ({"min_pixels": 200_000, "max_pixels": 100_000}, "invalid_value", "max_pixels", "less than"),
        ({"max_pixels": 0}, "invalid_value", "max_pixels", ""),
        ({"min_pixels": "5000"}, "invalid_type", "min_pixels", ""),
        ({"max_pixels": True}, "invalid_type", "max_pixels", ""),
        ({"detail": "medium"}, "invalid_value", "detail", ""),
    ],
)
def test_native_bounds_are_checked(
    client: FlaskClient, fields: dict[str, Any], code: str, param: str, words: str
) -> None:
    body = {"image": LARGE, "prompt": "What is this?", "max_new_tokens": 1, **fields}
    error = error_of(client.post(VISION, json=body))
    assert (error["code"], error["param"]) == (code, param)
    assert words in error["message"]


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"max_pixels": MOST + 1}, "invalid_value", "max_pixels"),
        ({"min_pixels": 1}, "invalid_value", "min_pixels"),
        ({"min_pixels": 300_000, "max_pixels": 200_000}, "invalid_value", "max_pixels"),
        ({"max_pixels": -5}, "invalid_value", "max_pixels"),
        ({"max_pixels": 1.5}, "invalid_type", "max_pixels"),
        ({"detail": "LOW"}, "invalid_value", "detail"),
    ],
)
def test_openai_bounds_are_checked(
    client: FlaskClient, fields: dict[str, Any], code: str, field: str
) -> None:
    url = "data:image/jpeg;base64," + LARGE
    body = chat_body(image_part(url), image_part(url, **fields))
    error = error_of(client.post(CHAT, json=body))
    assert (error["code"], error["param"]) == (code, f"messages.0.content.2.image_url.{field}")


# The response cache tells the detail levels apart.


def test_cache_keeps_detail_levels_apart(client: FlaskClient) -> None:
    """The same bytes at low and high are two answers; a repeat of either is a hit at its own size."""
    image = encoded(picture(1280, 960, seed=7))
    hits = metric(client, "glmvision_cache_hits_total")
    low, _ = vision(client, temperature=0, image=image, detail="low")
    high, _ = vision(client, temperature=0, image=image, detail="high")
    assert metric(client, "glmvision_cache_hits_total") == hits
    assert low["image"]["resized_to"] != high["image"]["resized_to"]
    again_low, _ = vision(client, temperature=0, image=image, detail="low")
    again_high, _ = vision(
        client, temperature=0, image=image
    )  # no detail: the same size as high, still its own entry
    assert again_low["image"] == low["image"] and again_low["usage"] == low["usage"]
    assert again_high["image"] == high["image"]
    assert metric(client, "glmvision_cache_hits_total") == hits + 1
    assert vision(client, temperature=0, image=image, detail="high")[0]["image"] == high["image"]
    assert metric(client, "glmvision_cache_hits_total") == hits + 2


def test_perceptual_cache_keeps_detail_levels_apart(full_budget_dir: Path) -> None:
    """A perceptual match ignores the size the pixels come at: the detail must match too."""
    settings = {
        "GLMVISION_MODEL": str(full_budget_dir),
        "GLMVISION_DEVICE": "cpu",
        "GLMVISION_CACHE_PHASH_DISTANCE": "8",
    }
    app = create_app(settings)
    app.config["TESTING"] = True
    base = picture(1280, 960, seed=11)
    first, second, third = (encoded(base, compress_level=level) for level in (1, 6, 9))
    assert len({first, second, third}) == 3  # other bytes: only the pixels can match
    with app.test_client() as client:
        low, _ = vision(client, temperature=0, image=first, detail="low")
        hits = metric(client, "glmvision_cache_hits_total")
        high, _ = vision(client, temperature=0, image=second, detail="high")
        assert metric(client, "glmvision_cache_hits_total") == hits
        assert high["image"]["resized_to"] != low["image"]["resized_to"]
        again, _ = vision(
            client, temperature=0, image=third, detail="low"
        )  # the same pixels at the same detail
        assert metric(client, "glmvision_cache_hits_total") == hits + 1
        assert again["image"] == low["image"]


# An upstream engine is told the detail.


def test_detail_reaches_an_upstream_engine() -> None:
    """The pipeline's message for an image keeps its detail; the upstream request carries it."""
    image = Image.new("RGB", (56, 56), "white")
    low = DecodedImage(image, 56, 56, (56, 56), budget=PixelBudget("low"))
    plain = DecodedImage(image, 56, 56, (56, 56))
    sent = openai_messages(to_messages([Turn("user", [low, plain, "Which?"])]))
    first, second, _ = sent[0]["content"]
    assert first["image_url"]["detail"] == "low" and first["image_url"]["url"].startswith("data:image/png")
    assert "detail" not in second["image_url"]


def test_budget_bounds() -> None:
    """detail low caps at 256 tokens' pixels, or the server's own maximum when that is lower."""
    assert PixelBudget("low").bounds(LEAST, MOST) == (LEAST, LOW_DETAIL_PIXELS)
    assert PixelBudget("low").bounds(LEAST, 15_680) == (LEAST, 15_680)
    assert PixelBudget("high").bounds(LEAST, MOST) == (LEAST, MOST)
    assert PixelBudget("low", max_pixels=MOST).bounds(LEAST, MOST) == (LEAST, MOST)
    assert PixelBudget(min_pixels=10_000).bounds(LEAST, MOST) == (10_000, MOST)
    assert PixelBudget("auto").is_default and not PixelBudget("high").is_default
    assert PixelBudget("low").key() != PixelBudget("high").key() and PixelBudget("auto").key() is None
    assert sys.modules[PixelBudget.__module__].LOW_DETAIL_PIXELS == 256 * TOKEN


def test_processor_limits_are_glm_46v_flash_ones(full_budget_dir: Path) -> None:
    """The bounds above are the processor's own, halved for the temporal patch."""
    processor = AutoProcessor.from_pretrained(full_budget_dir).image_processor
    assert processor.temporal_patch_size == 2
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (2 * LEAST, 2 * MOST)
