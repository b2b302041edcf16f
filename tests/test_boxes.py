"""Grounding boxes: found in answers (both of GLM-4.6V's ways, partial and malformed ones left out),
put in the user's pixels exactly, and returned by every endpoint, streamed too."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from helpers import vision_body
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from test_upstream import Scripted, chunk, scripted  # noqa: F401 - the fixture, a canned upstream

from glmvision.postprocess.boxes import FoundBox, find_boxes, normalised, place_boxes, to_pixels


def test_marker_lists_and_labelled_json_are_found_in_order() -> None:
    text = (
        'First {"bbox_2d": [10, 20, 30, 40], "label": "cat"}, then [[100,200,300,400], [5.5, 6, 7, 8]] '
        "and [[900, 900, 950, 990]]."
    )
    assert find_boxes(text) == [
        FoundBox((10, 20, 30, 40), "cat", 0),
        FoundBox((100, 200, 300, 400), None, 1),
        FoundBox((5.5, 6, 7, 8), None, 1),
        FoundBox((900, 900, 950, 990), None, 2),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "[[100,200,300",  # cut off mid-box
        "[[100,200,300,400",  # no closing bracket
        '{"bbox_2d": [1, 2, 3], "label": "short"}',  # three numbers
        '{"bbox_2d": [1, 2, 3, "x"]}',  # not numbers
        '{"bbox_2d": [1, 2, 3, true]}',  # a boolean is no coordinate
        '{"bbox_2d": [1, 2, 3, 4], "label": }',  # broken JSON
        "[100, 200, 300, 400]",  # a plain list: not a box without the model's double brackets
        "no boxes at all",
    ],
)
def test_partial_and_malformed_boxes_are_left_out(text: str) -> None:
    assert find_boxes(text) == []


def test_out_of_range_and_swapped_corners_are_clamped_and_ordered() -> None:
    (box,) = find_boxes("[[1200, -5, 300, 400]]")
    assert box.box == (300, 0, 1000, 400)


coordinate = st.floats(min_value=-2000, max_value=3000, allow_nan=False, allow_infinity=False)


@given(st.tuples(coordinate, coordinate, coordinate, coordinate), st.integers(1, 8000), st.integers(1, 8000))
def test_pixels_are_inside_the_image_ordered_and_proportional(
    values: tuple[float, float, float, float], width: int, height: int
) -> None:
    box = normalised(values)
    x1, y1, x2, y2 = to_pixels(box, width, height)
    assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
    for pixel, norm, side in (
        (x1, box[0], width),
        (y1, box[1], height),
        (x2, box[2], width),
        (y2, box[3], height),
    ):
        assert pixel == pytest.approx(norm * side / 1000, abs=0.005)


@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(1, 4000), st.integers(1, 4000))
def test_the_same_box_on_a_resized_image_is_the_same_part_of_it(w: int, h: int, w2: int, h2: int) -> None:
    # The model saw a resized copy; the box is a fraction of each side, so it maps to any size alike.
    box = normalised((250, 100, 750, 900))
    small, big = to_pixels(box, w, h), to_pixels(box, w2, h2)
    for a, b, side_a, side_b in zip(small, big, (w, h, w, h), (w2, h2, w2, h2), strict=True):
        assert a / side_a == pytest.approx(b / side_b, abs=0.01)


def test_boxes_go_to_the_newest_image_or_one_group_per_image_of_the_question() -> None:
    sizes = [(100, 50), (200, 100), (400, 400)]
    newest = place_boxes("[[0, 0, 500, 500]] and [[500, 500, 1000, 1000]]", sizes, last_turn_images=1)
    assert [(b.image, b.pixels) for b in newest] == [(2, (0, 0, 200, 200)), (2, (200, 200, 400, 400))]
    paired = place_boxes("one [[0, 0, 500, 500]] two [[0, 0, 1000, 1000]]", sizes[1:], last_turn_images=2)
    assert [(b.image, b.pixels) for b in paired] == [(0, (0, 0, 100, 50)), (1, (0, 0, 400, 400))]
    assert place_boxes("[[0, 0, 10, 10]]", [], last_turn_images=0) == []


def rotated_jpeg(width: int, height: int, orientation: int) -> str:
    """A JPEG stored `width` x `height` whose EXIF says to rotate it (6: 90 degrees clockwise)."""
    image = Image.new("RGB", (width, height), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


BOXED = (
    "The sign <|begin_of_box|>[[0,0,500,250]]<|end_of_box|> and "
    '{"bbox_2d": [500, 500, 1000, 1000], "label": "door"}'
)


def answered_with(scripted: Scripted, text: str) -> None:  # noqa: F811
    scripted.events = [
        chunk(content=text),
        chunk("stop", {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}),
    ]


def test_every_endpoint_returns_the_boxes_in_the_users_pixels(
    scripted: Scripted,  # noqa: F811
    make_app: Callable[..., Flask],
) -> None:
    # The upstream backend with a canned upstream: the model's words are chosen, the rest is ours.
    answered_with(scripted, BOXED)
    client = make_app(backend="openai", upstream_url=scripted.url, cache="0").test_client()
    image = rotated_jpeg(200, 100, 6)  # stored 200 x 100; the user sees it upright, 100 x 200
    expected = [
        {"image": 0, "box": [0.0, 0.0, 500.0, 250.0], "pixels": [0.0, 0.0, 50.0, 50.0], "label": None},
        {
            "image": 0,
            "box": [500.0, 500.0, 1000.0, 1000.0],
            "pixels": [50.0, 100.0, 100.0, 200.0],
            "label": "door",
        },
    ]
    vision = client.post("/v1/chat/vision", json=vision_body(image=image)).get_json()
    assert vision["image"]["width"] == 100 and vision["image"]["height"] == 200
    assert vision["boxes"] == expected
    seed = client.post("/v1/chat", json={"image_url": image, "prompt": "Where?"}).get_json()
    assert seed["boxes"] == expected
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + image}},
                {"type": "text", "text": "Where?"},
            ],
        }
    ]
    whole = client.post("/v1/chat/completions", json={"messages": messages}).get_json()
    assert whole["choices"][0]["message"]["boxes"] == expected
    streamed = client.post(
        "/v1/chat/completions", json={"messages": messages, "stream": True}, buffered=False
    )
    payloads = [
        json.loads(line[len("data: ") :])
        for line in b"".join(streamed.response).decode().splitlines()  # type: ignore[arg-type]
        if line.startswith("data: {")
    ]
    finish = [p for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["delta"]["boxes"] == expected
    assert all("boxes" not in p["choices"][0]["delta"] for p in payloads if p not in finish and p["choices"])


def test_an_answer_without_boxes_keeps_the_openai_shape(
    scripted: Scripted,  # noqa: F811
    make_app: Callable[..., Flask],
) -> None:
    answered_with(scripted, "Nothing to point at.")
    client = make_app(backend="openai", upstream_url=scripted.url, cache="0").test_client()
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}]}
    message = client.post("/v1/chat/completions", json=body).get_json()["choices"][0]["message"]
    assert set(message) == {"role", "content"}
    assert client.post("/v1/chat/vision", json=vision_body()).get_json()["boxes"] == []
    seed = client.post("/v1/chat", json={"image_url": vision_body()["image"], "prompt": "Hi"}).get_json()
    assert "boxes" not in seed  # the reference guides' shape, unchanged


def test_order_labels_and_bad_json_between_good_boxes() -> None:
    text = '[[1, 2, 3, 4]] then {"bbox_2d": [1, 2, 3} broken, then {"bbox_2d": [5, 6, 7, 8]} unlabelled'
    assert find_boxes(text) == [FoundBox((1, 2, 3, 4), None, 1), FoundBox((5, 6, 7, 8), None, 0)]
    assert to_pixels((333, 1, 999, 1000), 7, 3) == (2.33, 0.0, 6.99, 3.0)  # 0.01 px


def test_fewer_groups_than_the_questions_images_go_to_the_newest() -> None:
    sizes = [(10, 10), (20, 20), (40, 40)]
    boxes = place_boxes("[[0, 0, 1000, 1000]] and [[0, 0, 500, 500]]", sizes, last_turn_images=3)
    assert [(b.image, b.pixels) for b in boxes] == [(2, (0, 0, 40, 40)), (2, (0, 0, 20, 20))]
