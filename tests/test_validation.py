"""Request validation in the models: every problem of a body is reported, the first one on top."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from helpers import image_b64, vision_body

CHAT = "/v1/chat/completions"


def chat_body(**fields: Any) -> dict[str, Any]:
    """A valid chat completion body with overrides."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    body.update(fields)
    return body


def problems(response: Any) -> tuple[tuple[str, str | None], list[tuple[str, str | None]]]:
    """(code, param) of the top-level error and of every listed one, after checking the envelope."""
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    listed = error["errors"]
    assert all(set(item) == {"code", "param", "message"} and item["message"] for item in listed)
    assert listed[0] == {"code": error["code"], "param": error["param"], "message": error["message"]}
    return (error["code"], error["param"]), [(item["code"], item["param"]) for item in listed]


def test_three_bad_fields_are_all_reported(client: FlaskClient) -> None:
    body = vision_body(temperature=9, seed=-1, enable_thinking="yes")
    first, listed = problems(client.post("/v1/chat/vision", json=body))
    assert first == ("invalid_value", "temperature")
    assert listed == [
        ("invalid_value", "temperature"),
        ("invalid_value", "seed"),
        ("invalid_type", "enable_thinking"),
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"image_url": "data:image/png;base64," + image_b64()}, [("invalid_value", "image_url")]),
        ({"image": None}, [("missing_field", "image")]),
        # Field errors come first (the top-level error is unchanged), the image rule after them.
        (
            {"image_url": "x", "prompt": 5, "top_p": 0},
            [("invalid_value", "top_p"), ("invalid_type", "prompt"), ("invalid_value", "image_url")],
        ),
        (
            {"image": None, "max_new_tokens": 0},
            [("invalid_value", "max_new_tokens"), ("missing_field", "image")],
        ),
    ],
    ids=["both", "neither", "both-and-fields", "neither-and-field"],
)
def test_exactly_one_image_is_a_model_rule(
    client: FlaskClient, fields: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    first, listed = problems(client.post("/v1/chat/vision", json=vision_body(**fields)))
    assert listed == expected
    assert first == expected[0]


def test_seed_chat_reports_every_field(client: FlaskClient) -> None:
    first, listed = problems(client.post("/v1/chat", json={"prompt": ["a"], "seed": "1"}))
    assert listed == [("invalid_type", "seed"), ("missing_field", "image_url"), ("invalid_type", "prompt")]
    assert first == listed[0]


@pytest.mark.parametrize(
    ("fields", "code", "param"),
    [
        ({"n": 9}, "invalid_value", "n"),  # above GLMVISION_MAX_N (8)
        ({"n": 0}, "invalid_value", "n"),
        ({"n": "1"}, "invalid_type", "n"),
        ({"stop": ""}, "invalid_value", "stop"),
        ({"stop": ["a", ""]}, "invalid_value", "stop"),
        ({"stop": ["s"] * 9}, "invalid_value", "stop"),
        ({"stop": 7}, "invalid_type", "stop"),
        ({"stop": ["a", 1]}, "invalid_type", "stop"),
        (
            {"chat_template_kwargs": {"enable_thinking": "yes"}},
            "invalid_type",
            "chat_template_kwargs.enable_thinking",
        ),
        (
            {"chat_template_kwargs": {"enable_thinking": 1}},
            "invalid_type",
            "chat_template_kwargs.enable_thinking",
        ),
    ],
)
def test_chat_rules_live_in_the_model(
    client: FlaskClient, fields: dict[str, Any], code: str, param: str
) -> None:
    first, listed = problems(client.post(CHAT, json=chat_body(**fields)))
    assert first == (code, param)
    assert listed == [(code, param)]


def test_chat_rules_come_after_field_errors_in_their_old_order(client: FlaskClient) -> None:
    """enable_thinking, then stop, after every plain field error: the first error is as before (n's cap
    is the server's, checked once the request is valid)."""
    body = chat_body(
        stop="", n=9, chat_template_kwargs={"enable_thinking": "no"}, stream="yes", temperature=-1
    )
    first, listed = problems(client.post(CHAT, json=body))
    assert listed == [
        ("invalid_value", "temperature"),
        ("invalid_type", "stream"),
        ("invalid_type", "chat_template_kwargs.enable_thinking"),
        ("invalid_value", "stop"),
    ]
    assert first == ("invalid_value", "temperature")


def test_valid_stop_and_thinking_are_accepted_and_other_template_kwargs_ignored(client: FlaskClient) -> None:
    body = chat_body(stop=["zz", "yy"], chat_template_kwargs={"enable_thinking": True, "other": 1}, n=1)
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert isinstance(response.get_json()["choices"][0]["message"]["reasoning_content"], str)


def test_a_single_error_lists_itself(client: FlaskClient) -> None:
    response = client.post("/v1/chat/vision", json=vision_body(prompt="   "))
    first, listed = problems(response)
    assert first == ("invalid_value", "prompt") and listed == [first]
    assert response.get_json()["success"] is False


def test_an_empty_last_message_is_listed_beside_the_other_problems(client: FlaskClient) -> None:
    """It was checked only once every field passed, so a body with a bad field lost it."""
    body = chat_body(messages=[{"role": "user", "content": "  "}], max_tokens=-1, temperature=9)
    first, listed = problems(client.post(CHAT, json=body))
    assert listed == [
        ("invalid_value", "max_tokens"),
        ("invalid_value", "temperature"),
        ("invalid_value", "messages.0.content"),
    ]
    assert first == ("invalid_value", "max_tokens")
    for content in ("", [], None, [{"type": "text", "text": ""}]):
        alone = problems(client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": content}])))
        assert alone == (("invalid_value", "messages.0.content"), [("invalid_value", "messages.0.content")])
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64()}}]
    assert client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": image}])).status_code == 200


def test_a_missing_image_names_both_fields_it_may_come_in(client: FlaskClient) -> None:
    response = client.post("/v1/chat/vision", json={"prompt": "What is this?"})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert (error["code"], error["param"]) == ("missing_field", "image")
    assert "'image_url'" in error["message"]


def test_an_unknown_model_is_answered_with_the_served_ids(client: FlaskClient) -> None:
    response = client.post(CHAT, json=chat_body(model="gpt-4o"))
    assert response.status_code == 404
    error = response.get_json()["error"]
    served = [card["id"] for card in client.get("/v1/models").get_json()["data"]]
    assert error["code"] == "model_not_found" and served
    assert error["message"] == f"The model 'gpt-4o' does not exist; this server serves: {', '.join(served)}."
