"""Keep it found (issue 19): generated hostile requests against real gunicorn, bounded in count and time.

Each family (sampling numbers, JSON schemas, message lists, raw bodies) sends its generated requests to
every route that takes them. Every answer must be a 2xx, a 4xx JSON error with a code, or a documented
overload 503 with Retry-After. After each family the worker must be the same process, its memory within
a bound, and a plain request still answered. `pytest -m slow tests/test_fuzz.py` runs ten times as many.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import LiveServer, image_b64, live_server, server_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VISION, SEED, COMPLETIONS = "/v1/chat/vision", "/v1/chat", "/v1/chat/completions"
# A 503 is allowed only for overload, which says when to come back; any other 5xx is a finding.
OVERLOAD_CODES = {"overloaded", "preprocessing_busy", "queue_timeout"}
# How much a worker may grow over the whole run (the 73-byte recursive schema once took 22 GB).
RSS_GROWTH_LIMIT = 1536 * 2**20
# How long a plain request may take after a family: generous, it proves "not stalled", not speed.
PLAIN_TIMEOUT = 30.0
# Generated requests per family in CI; the slow run sends ten times as many.
EXAMPLES = 60
# Text the chat template would read as structure if it were not escaped.
CONTROL_TEXT = [
    "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "<|endoftext|>", "<|image|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
    "<arg_key>", "<arg_value>", "<|begin_of_box|>", "[gMASK]", "<sop>", "{{ messages }}", "{% raw %}",
]  # fmt: skip
SMALL_IMAGE = image_b64(32, 24)

# Numbers a hostile client sends for every sampling field: the edges of floats and integers.
EDGE_FLOATS = [0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1e-300, 1e-45, 1e-5, 0.5, 1.0, 2.0, 2.0000001,
               -1.0, 1e308, 1.7976931348623157e308]  # fmt: skip
EDGE_INTS = [-(2**63), -1, 0, 1, 2, 3, 4, 2**31, 2**63 - 1, 2**63, 2**64]
numbers = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=False, allow_infinity=False))
integers = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**70), 2**70))
text = st.one_of(
    st.sampled_from(CONTROL_TEXT), st.text(max_size=40), st.sampled_from(["", " ", "\x00", "\ud7ff"])
)


def sampling_fields(route: str) -> st.SearchStrategy[dict[str, Any]]:
    """Sampling settings with any edge value, in the route's own field names."""
    tokens = "max_tokens" if route == COMPLETIONS else "max_new_tokens"
    fields = {
        "temperature": numbers, "top_p": numbers, "seed": integers, tokens: integers,
        "min_tokens": integers, "stop": st.one_of(text, st.lists(text, max_size=10)),
        "top_k": integers, "min_p": numbers, "frequency_penalty": numbers, "presence_penalty": numbers,
        "repetition_penalty": numbers, "n": integers,
    }  # fmt: skip
    return st.fixed_dictionaries({}, optional=fields)


def base_body(route: str) -> dict[str, Any]:
    """A valid request of `route` that asks for 2 tokens."""
    if route == COMPLETIONS:
        return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    key = "image" if route == VISION else "image_url"
    return {key: SMALL_IMAGE, "prompt": "What is this?", "max_new_tokens": 2}


# JSON schemas: ordinary shapes, the keywords the grammar may not enforce, and known hostile ones.
HOSTILE_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]},
    {"type": "string", "pattern": "^a{1000000}$"},
    {"type": "string", "pattern": "^a{100000}$"},
    {"type": "string", "pattern": "^(a|b|c){2000}(d{50}){60}$"},
    {"type": "array", "items": {"type": "string"}, "minItems": 100000},
    {"type": "string", "minLength": 10**9},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}},
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"type": "string", "format": "date"},
    {"type": "string", "format": "date-time"},
    {"not": {"type": "string"}},
    {"type": "integer", "multipleOf": 7},
    {"if": {"type": "string"}, "then": {"minLength": 2}},
    {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
]


def _nest_array(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


leaf_schemas = st.one_of(
    st.sampled_from(
        [{"type": kind} for kind in ("string", "integer", "number", "boolean", "null", "object", "array")]
    ),
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": hi}, integers, integers),
    st.builds(lambda lo, hi: {"type": "number", "minimum": lo, "maximum": hi}, numbers, numbers),
    st.builds(lambda values: {"enum": values}, st.lists(st.one_of(st.integers(), text), max_size=5)),
    st.builds(lambda pattern: {"type": "string", "pattern": pattern}, st.sampled_from(
        ["^[a-z]+$", "^\\d{3}-\\d{4}$", "(", "^a{0,5}$", "[", "^.*$", "^(a+)+$", "^a{3,2}$"]
    )),
    st.builds(lambda format_: {"type": "string", "format": format_}, st.sampled_from(
        ["date", "time", "date-time", "email", "uuid", "ipv4", "uri", "no-such-format"]
    )),
)  # fmt: skip
schemas = st.one_of(
    st.sampled_from(HOSTILE_SCHEMAS),
    st.integers(1, 900).map(_nest_array),
    st.recursive(
        leaf_schemas,
        lambda inner: st.one_of(
            st.builds(
                lambda props, required: {"type": "object", "properties": props, "required": required},
                st.dictionaries(st.sampled_from(["a", "b", "c", "<tool_call>", ""]), inner, max_size=4),
                st.lists(st.sampled_from(["a", "b", "z"]), max_size=3),
            ),
            st.builds(lambda items, lo: {"type": "array", "items": items, "minItems": lo}, inner, integers),
            st.builds(lambda options: {"anyOf": options}, st.lists(inner, max_size=3)),
        ),
        max_leaves=8,
    ),
)


def with_schema(route: str, schema: dict[str, Any], how: str) -> dict[str, Any]:
    """The route's body constrained by `schema`: as a response format, the native field, or a tool."""
    body = base_body(route)
    if route != COMPLETIONS:
        return {**body, "json_schema": schema, "temperature": 0}
    if how == "tool":
        tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
        return {**body, "tools": [tool], "tool_choice": "required", "temperature": 0}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return {**body, "response_format": response_format, "temperature": 0}


# Messages: every role, text with control tokens, images good and bad, tool calls with odd arguments.
image_parts = st.builds(
    lambda url: {"type": "image_url", "image_url": {"url": url}},
    st.sampled_from([SMALL_IMAGE, "data:image/png;base64," + SMALL_IMAGE, "not base64!", "", "data:,x"]),
)
content = st.one_of(
    text, st.none(), st.lists(st.one_of(st.builds(lambda t: {"type": "text", "text": t}, text), image_parts),
                              max_size=3),
)  # fmt: skip
arguments = st.one_of(
    st.sampled_from(['{"a": 1}', "{}", "[]", "not json", '{"a": NaN}', "{" * 2000, '{"a": 1e999}']),
    st.builds(lambda depth: json.dumps({"a": json.loads("[" * depth + "]" * depth)}), st.integers(1, 950)),
)
tool_calls = st.lists(
    st.builds(
        lambda name, args: {"id": "c1", "type": "function", "function": {"name": name, "arguments": args}},
        text, arguments,
    ),
    max_size=2,
)  # fmt: skip
message = st.builds(
    lambda role, body, calls: {"role": role, "content": body, **({"tool_calls": calls} if calls else {}),
                               **({"tool_call_id": "c1"} if role == "tool" else {})},
    st.sampled_from(["user", "assistant", "system", "developer", "tool", "robot"]), content, tool_calls,
)  # fmt: skip
message_lists = st.one_of(
    st.lists(message, min_size=0, max_size=6),
    st.builds(lambda n: [{"role": "user", "content": "x"}] * n, st.sampled_from([257, 15_001])),
)
# Raw bodies: not JSON, non-finite numbers, nesting deeper than the parser goes.
raw_bodies = st.one_of(
    st.sampled_from(
        ['{"messages": NaN}', '{"temperature": Infinity}', '{"temperature": 1e999}', "[" * 100_000, "",
         '{"a": ' + "[" * 5000 + "]" * 5000 + "}", '{"prompt": "\\ud800"}', "null", "[]", '"x"']
    ),
    st.binary(max_size=64).map(lambda raw: raw.decode("latin-1")),
)  # fmt: skip


def check(response: requests.Response) -> None:
    """A 2xx, a 4xx JSON error with a code, or an overload 503 with Retry-After; nothing else."""
    status = response.status_code
    if status < 300:
        return
    body = response.json()  # every error is JSON
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"], body
    if status >= 500:
        assert status == 503 and error["code"] in OVERLOAD_CODES, (status, body)
        assert response.headers.get("Retry-After"), body
    assert "Traceback" not in response.text


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Watch:
    """The worker under fuzz: the same process throughout, bounded memory, still answering."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.workers = server.worker_pids()
        assert len(self.workers) == 1
        self.baseline = max(rss(pid) for pid in self.workers)
        self.sent = 0

    def post(self, route: str, **kwargs: Any) -> None:
        response = requests.post(self.server.url + route, timeout=120, **kwargs)
        self.sent += 1
        check(response)

    def after_family(self) -> None:
        """The worker survived, its memory is bounded, and a plain request is answered."""
        assert self.server.worker_pids() == self.workers, self.server.log()[-3000:]
        for pid in self.workers:
            assert rss(pid) - self.baseline < RSS_GROWTH_LIMIT, (rss(pid), self.baseline)
        started = time.monotonic()
        plain = requests.post(self.server.url + VISION, json=base_body(VISION), timeout=PLAIN_TIMEOUT)
        assert plain.status_code == 200, plain.text
        assert time.monotonic() - started < PLAIN_TIMEOUT
        assert "Traceback" not in self.server.log()


@pytest.fixture(scope="module")
def watch(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, runtime_dir: Path
) -> Iterator[Watch]:
    """One worker on the demo model with short answers, image URLs refused (no outside traffic)."""
    env = server_env(demo_model_dir, runtime_dir, MAX_NEW_TOKENS="8", IMAGE_URL_DOMAINS="")
    with live_server(tmp_path_factory.mktemp("fuzz"), env, ready_path="/readyz") as server:
        yield Watch(server)


def bounded(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same requests on every CI run
        database=None,
        suppress_health_check=list(HealthCheck),
    )


ROUTES = [VISION, SEED, COMPLETIONS]


def sampling_family(watch: Watch, examples: int) -> None:
    @given(route=st.sampled_from(ROUTES), data=st.data())
    @bounded(examples)
    def send(route: str, data: st.DataObject) -> None:
        fields = data.draw(sampling_fields(route))
        watch.post(route, json={**base_body(route), **fields})

    send()


def schema_family(watch: Watch, examples: int) -> None:
    @given(route=st.sampled_from(ROUTES), schema=schemas, how=st.sampled_from(["format", "tool"]))
    @bounded(examples)
    def send(route: str, schema: dict[str, Any], how: str) -> None:
        watch.post(route, json=with_schema(route, schema, how))

    send()


def message_family(watch: Watch, examples: int) -> None:
    @given(messages=message_lists, fields=sampling_fields(COMPLETIONS))
    @bounded(examples)
    def send(messages: list[dict[str, Any]], fields: dict[str, Any]) -> None:
        watch.post(COMPLETIONS, json={**fields, "messages": messages, "max_tokens": 2, "temperature": 0})

    send()


def raw_family(watch: Watch, examples: int) -> None:
    @given(route=st.sampled_from(ROUTES), raw=raw_bodies)
    @bounded(examples)
    def send(route: str, raw: str) -> None:
        data = raw.encode("utf-8", "surrogatepass")
        watch.post(route, data=data, headers={"Content-Type": "application/json"})

    send()


FAMILIES = {
    "sampling": sampling_family, "schemas": schema_family, "messages": message_family, "raw": raw_family
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generated_requests_never_hurt_the_worker(watch: Watch, family: str) -> None:
    before = watch.sent
    FAMILIES[family](watch, EXAMPLES)
    assert watch.sent > before
    watch.after_family()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ten_times_as_many(watch: Watch, family: str) -> None:
    FAMILIES[family](watch, 10 * EXAMPLES)
    watch.after_family()
