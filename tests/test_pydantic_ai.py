"""pydantic-ai, as its users call it, against real gunicorn: an image question through its Chat
Completions model and its Responses model, whole and streamed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LiveServer, image_bytes, live_server, server_env
from pydantic_ai import Agent, BinaryContent
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider

from glmvision.backends.local.loading import DEMO_MODEL_ID


@pytest.fixture(scope="module")
def server(
    demo_model_dir: Path, runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    env = server_env(demo_model_dir, runtime_dir)
    with live_server(tmp_path_factory.mktemp("pydantic-ai"), env, ready_path="/readyz") as live:
        yield live


def agent(server: LiveServer, kind: Any) -> Agent[None, str]:
    provider = OpenAIProvider(base_url=server.url + "/v1", api_key="unused")
    settings = {"max_tokens": 8, "temperature": 0.0}
    return Agent(kind(DEMO_MODEL_ID, provider=provider), model_settings=settings)  # type: ignore[arg-type]


QUESTION = [
    "What is in this picture?",
    BinaryContent(data=image_bytes(64, 48, "PNG"), media_type="image/png"),
]


@pytest.mark.parametrize("kind", [OpenAIChatModel, OpenAIResponsesModel], ids=["chat", "responses"])
def test_an_image_question_gets_an_answer_whole_and_streamed(server: LiveServer, kind: Any) -> None:
    ask = agent(server, kind)
    whole = ask.run_sync(QUESTION)
    assert isinstance(whole.output, str)
    usage = whole.usage
    assert usage.input_tokens > 12 and 1 <= usage.output_tokens <= 8  # the image's tokens counted in
    streamed = ask.run_stream_sync(QUESTION)
    text = streamed.get_output()
    assert isinstance(text, str) and text == whole.output  # greedy: the same answer either way
