"""Named API keys (the keys file's TOML form), per-key usage accounting and quotas."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from helpers import LiveServer, image_b64, live_server, redis_server, server_env, wait_for

from glmvision.cli.main import main as cli_main
from glmvision.core.config import ConfigError, load_settings
from glmvision.core.keys import load_keys, parse_keys_toml

ADMIN_KEY, ALPHA_KEY, BETA_KEY = "sk-admin-0001", "sk-alpha-0002", "sk-beta-0003"
MAX_TOKENS = 4
# alpha may spend 3 answers' worst case (3 x max_tokens) of completion tokens, plus their prompts once.
KEYS_TOML = f"""
[keys.ops]
key = "{ADMIN_KEY}"
admin = true

[keys.alpha]
key_sha256 = "{hashlib.sha256(ALPHA_KEY.encode()).hexdigest()}"
images_per_day = 2
models = ["glm-4.6v-flash"]

[keys.beta]
key = "{BETA_KEY}"
tokens_per_day = 1000000
"""


def body(images: int = 1, **fields: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64(32, 32)}}
        for _ in range(images)
    ]
    content.append({"type": "text", "text": "What is this?"})
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **fields,
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- The TOML form ------------------------------------------------------------------------------------


def test_the_toml_form_names_keys_with_limits_models_and_admin() -> None:
    specs = {spec.name: spec for spec in parse_keys_toml(KEYS_TOML)}
    assert set(specs) == {"ops", "alpha", "beta"}
    assert specs["ops"].admin and not specs["alpha"].admin
    assert specs["alpha"].digest == hashlib.sha256(ALPHA_KEY.encode()).digest()
    assert specs["beta"].digest == hashlib.sha256(BETA_KEY.encode()).digest()
    assert specs["alpha"].images_per_day == 2 and specs["alpha"].tokens_per_day is None
    assert specs["beta"].tokens_per_day == 1000000
    assert specs["alpha"].allows(None) and not specs["alpha"].allows("gauges")
    assert specs["beta"].allows("gauges")  # no models: every model and adapter
    assert "sk-" not in repr(specs["ops"])  # neither key nor digest in a repr


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[keys.a]\nkey = 'x'\nkey_sha256 = '" + "0" * 64 + "'", "exactly one of key and key_sha256"),
        ("[keys.a]\nadmin = true", "exactly one of key and key_sha256"),
        ("[keys.a]\nkey_sha256 = 'abc'", "64 hex digits"),
        ("[keys.a]\nkey = 'x'\ntokens_per_day = -1", "tokens_per_day must be a whole number"),
        ("[keys.a]\nkey = 'x'\nrequests_per_minute = 'many'", "requests_per_minute must be a whole number"),
        ("[keys.a]\nkey = 'x'\nmodels = 'glm'", "models must be a list"),
        ("[keys.a]\nkey = 'x'\nadmin = 'yes'", "admin must be true or false"),
        ("[keys.a]\nkey = 'x'\nquota = 3", "unknown field 'quota'"),
        ("[keys.a]\nkey = 'x'\n[keys.b]\nkey = 'x'", "the same key as [keys.a]"),
        ("[keys.'a b']\nkey = 'x'", "a name is 1-64 letters"),
        ("[users.a]\nkey = 'x'", "unknown table"),
        ("", "no [keys.<name>] tables"),
        ("[keys.a\nkey = 'x'", "not valid TOML"),
    ],
)
def test_a_mistake_in_the_toml_form_is_one_config_error_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_keys_toml(text, "keys.toml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("GLMVISION_API_KEYS_FILE: keys.toml")
    assert problem in message
    assert "'x'" not in message.replace("key = 'x'", "")  # a key's value is never echoed


def test_a_plain_keys_file_keeps_working_and_a_toml_one_adds_named_keys(tmp_path: Path) -> None:
    plain = tmp_path / "keys.txt"
    plain.write_text("# comment\nsk-one\n\nsk-two\n")
    specs = load_keys(load_settings({"GLMVISION_API_KEYS_FILE": str(plain), "GLMVISION_API_KEYS": "sk-env"}))
    assert [spec.name for spec in specs] == [None, None, None]
    assert {spec.digest for spec in specs} == {
        hashlib.sha256(k.encode()).digest() for k in ("sk-env", "sk-one", "sk-two")
    }
    named = tmp_path / "keys.toml"
    named.write_text(KEYS_TOML)
    specs = load_keys(load_settings({"GLMVISION_API_KEYS_FILE": str(named), "GLMVISION_API_KEYS": "sk-env"}))
    assert [spec.name for spec in specs] == [None, "ops", "alpha", "beta"]


# --- In one app (the test client) ---------------------------------------------------------------------


@pytest.fixture
def keyed_app(make_app: Callable[..., Flask], tmp_path: Path) -> Flask:
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS_TOML)
    return make_app(api_keys_file=str(keys))


def test_a_key_outside_its_models_gets_403_model_not_allowed(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.tuned]\nkey = "sk-tuned"\nmodels = ["glm-4.6v-flash:gauges"]\n' + KEYS_TOML)
    client = make_app(api_keys_file=str(keys)).test_client()
    refused = client.post("/v1/chat/completions", json=body(), headers=bearer("sk-tuned"))
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "model_not_allowed"
    allowed = client.post("/v1/chat/completions", json=body(), headers=bearer(ALPHA_KEY))
    assert allowed.status_code == 200, allowed.get_json()


def test_images_per_day_is_counted_per_image_and_refused_with_retry_after(keyed_app: Flask) -> None:
    client = keyed_app.test_client()
    first = client.post("/v1/chat/completions", json=body(images=2), headers=bearer(ALPHA_KEY))
    assert first.status_code == 200, first.get_json()
    assert first.headers["X-Quota-Remaining-Images"] == "0"
    over = client.post("/v1/chat/completions", json=body(images=1), headers=bearer(ALPHA_KEY))
    assert over.status_code == 429
    assert over.get_json()["error"]["code"] == "quota_exceeded"
    assert 1 <= int(over.headers["Retry-After"]) <= 86400
    assert over.headers["X-Quota-Remaining-Images"] == "0"
    # A text-only request spends no image budget.
    text_only = client.post("/v1/chat/completions", json=body(images=0), headers=bearer(ALPHA_KEY))
    assert text_only.status_code == 200


def test_requests_per_minute_refuses_the_request_over_it(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.slow]\nkey = "sk-slow"\nrequests_per_minute = 2\n[keys.fast]\nkey = "sk-fast"\n')
    client = make_app(api_keys_file=str(keys)).test_client()
    codes = [client.get("/v1/models", headers=bearer("sk-slow")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    again = client.get("/v1/models", headers=bearer("sk-slow"))
    assert again.get_json()["error"]["code"] == "quota_exceeded"
    assert 1 <= int(again.headers["Retry-After"]) <= 60
    assert again.headers["X-Quota-Remaining-Requests"] == "0"
    assert client.get("/v1/models", headers=bearer("sk-fast")).status_code == 200


def test_usage_is_for_admin_keys_only(keyed_app: Flask) -> None:
    client = keyed_app.test_client()
    refused = client.get("/v1/usage", headers=bearer(BETA_KEY))
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "admin_required"
    assert client.get("/v1/usage").status_code == 401
    assert client.get("/v1/usage", headers=bearer(ADMIN_KEY)).status_code == 200


def test_plain_keys_keep_todays_behaviour(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_keys="sk-plain").test_client()
    answered = client.post("/v1/chat/completions", json=body(), headers=bearer("sk-plain"))
    assert answered.status_code == 200
    assert not any(name.startswith("X-Quota") for name in answered.headers.keys())
    assert client.get("/v1/usage", headers=bearer("sk-plain")).get_json()["error"]["code"] == "admin_required"


# --- Real gunicorn, 2 workers, real Redis -------------------------------------------------------------

# A prompt of some 800 tokens (the demo tokenizer's), and a long answer to it that keeps a request in flight.
LONG_TEXT, LONG_MAX = "word " * 200, 512
# delta's budget covers max_tokens but not the long prompt on top of it.
DELTA_BUDGET = 100
# epsilon's budget fits one long request's worst case (prompt + LONG_MAX), not two; two LONG_MAX alone fit.
EPSILON_BUDGET = 2 * LONG_MAX + 400
ETA_BUDGET = 1_000_000
MORE_KEYS = f"""
[keys.gamma]
key = "sk-gamma-0004"
tokens_per_day = {2 * MAX_TOKENS + 400}

[keys.delta]
key = "sk-delta-0005"
tokens_per_day = {DELTA_BUDGET}

[keys.epsilon]
key = "sk-epsilon-0006"
tokens_per_day = {EPSILON_BUDGET}

[keys.eta]
key = "sk-eta-0007"
tokens_per_day = {ETA_BUDGET}
"""


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with redis_server(tmp_path_factory.mktemp("redis")) as port:
        yield port


@pytest.fixture(scope="module")
def shared_server(
    demo_model_dir: Path, runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory, redis_port: int
) -> Iterator[LiveServer]:
    workdir = tmp_path_factory.mktemp("keys")
    keys = workdir / "keys.toml"
    # gamma's budget: two answers' worst case plus a little: the third is refused at admission.
    keys.write_text(KEYS_TOML + MORE_KEYS)
    env = server_env(
        demo_model_dir,
        runtime_dir,
        WORKERS="2",
        API_KEYS_FILE=str(keys),
        USAGE_STORAGE_URI=f"redis://127.0.0.1:{redis_port}/0",
    )
    with live_server(workdir, env, ready_path="/healthz", timeout=180) as server:
        yield server


def test_quotas_and_usage_are_shared_by_the_workers(shared_server: LiveServer) -> None:
    url = shared_server.url
    spent: dict[str, dict[str, int]] = {}

    def ask(key: str, name: str, **fields: Any) -> requests.Response:
        response = requests.post(
            url + "/v1/chat/completions", json=body(**fields), headers=bearer(key), timeout=120
        )
        totals = spent.setdefault(name, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
        totals["requests"] += 1  # every request counts, a refused one too (as an error)
        if response.status_code == 200:
            usage = response.json()["usage"]
            totals["prompt_tokens"] += usage["prompt_tokens"]
            totals["completion_tokens"] += usage["completion_tokens"]
        return response

    # gamma spends its budget; whichever worker answers, the third is over (Redis holds the count).
    answered = [ask("sk-gamma-0004", "gamma", images=0) for _ in range(2)]
    assert [r.status_code for r in answered] == [200, 200], [r.text for r in answered]
    prompt = answered[0].json()["usage"]["prompt_tokens"]
    assert prompt + MAX_TOKENS <= 200  # the budget's margin covers both prompts
    remaining = int(answered[1].headers["X-Quota-Remaining-Tokens"])
    assert remaining >= 0
    refused = ask("sk-gamma-0004", "gamma", images=0, max_tokens=400)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400
    assert "X-Quota-Remaining-Tokens" in refused.headers
    # beta is unaffected.
    for _ in range(3):
        assert ask(BETA_KEY, "beta").status_code == 200

    report = requests.get(url + "/v1/usage", headers=bearer(ADMIN_KEY), timeout=30)
    assert report.status_code == 200
    assert report.json()["shared"] is True
    rows = {row["key"]: row for row in report.json()["data"]}
    for name, totals in spent.items():
        for field, value in totals.items():
            assert rows[name][field] == value, (name, field)
    assert rows["gamma"]["errors"] == 1  # the refused request counts as an error, with no tokens
    assert rows["beta"]["images"] == 3
    assert rows["beta"]["image_tokens"] > 0

    non_admin = requests.get(url + "/v1/usage", headers=bearer(BETA_KEY), timeout=30)
    assert non_admin.status_code == 403
    assert non_admin.json()["error"]["code"] == "admin_required"

    metrics = requests.get(url + "/metrics", timeout=30).text
    beta_requests = re.search(r'glmvision_key_requests_total\{key="beta",outcome="ok"\} (\S+)', metrics)
    assert beta_requests is not None and float(beta_requests.group(1)) == 3
    assert 'glmvision_key_requests_total{key="gamma",outcome="error"} 1.0' in metrics
    assert 'glmvision_key_tokens_total{key="beta",kind="completion"}' in metrics
    for secret in (ADMIN_KEY, ALPHA_KEY, BETA_KEY, "sk-gamma-0004"):
        assert secret not in metrics
        assert secret not in shared_server.log()
    assert '"key_id": "beta"' in shared_server.log() or '"key_id":"beta"' in shared_server.log()


def post_chat(server: LiveServer, key: str, payload: dict[str, Any], **kwargs: Any) -> requests.Response:
    return requests.post(
        server.url + "/v1/chat/completions", json=payload, headers=bearer(key), timeout=120, **kwargs
    )


def usage_of(server: LiveServer, name: str) -> dict[str, int]:
    """Today's totals of one key, from GET /v1/usage (zeros before its first request)."""
    report = requests.get(server.url + "/v1/usage", headers=bearer(ADMIN_KEY), timeout=30)
    assert report.status_code == 200, report.text
    rows = [row for row in report.json()["data"] if row["key"] == name]
    return max(rows, key=lambda row: row["day"]) if rows else {"requests": 0}


def streamed_usage(response: requests.Response) -> dict[str, int]:
    """The usage chunk of a streamed answer (asked with stream_options.include_usage)."""
    chunks = [line[len(b"data: ") :] for line in response.iter_lines() if line.startswith(b"data: {")]
    usages = [chunk["usage"] for chunk in map(json.loads, chunks) if chunk.get("usage")]
    assert len(usages) == 1, usages
    return usages[0]


def test_a_prompt_that_does_not_fit_beside_max_tokens_is_refused_before_generating(
    shared_server: LiveServer,
) -> None:
    long = body(images=0, messages=[{"role": "user", "content": LONG_TEXT}])
    probe = post_chat(shared_server, BETA_KEY, long)
    assert probe.status_code == 200, probe.text
    prompt = probe.json()["usage"]["prompt_tokens"]
    assert MAX_TOKENS <= DELTA_BUDGET < prompt + MAX_TOKENS  # max_tokens fits what is left, the prompt not

    refused = post_chat(shared_server, "sk-delta-0005", long)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400
    assert refused.headers["X-Quota-Remaining-Tokens"] == str(DELTA_BUDGET)  # its own hold is given back
    row = usage_of(shared_server, "delta")
    # Refused before the model generated: no tokens counted, one error.
    assert (row["requests"], row["errors"], row["prompt_tokens"], row["completion_tokens"]) == (1, 1, 0, 0)

    # The budget is whole again: a short prompt's worst case is held against all of it.
    short = post_chat(shared_server, "sk-delta-0005", body(images=0))
    assert short.status_code == 200, short.text
    held = short.json()["usage"]["prompt_tokens"] + MAX_TOKENS
    assert int(short.headers["X-Quota-Remaining-Tokens"]) == DELTA_BUDGET - held


def test_a_request_in_flight_holds_its_worst_case_and_a_cut_or_failed_one_gives_back_the_rest(
    shared_server: LiveServer,
) -> None:
    key, messages = "sk-epsilon-0006", [{"role": "user", "content": LONG_TEXT}]
    probe = post_chat(shared_server, BETA_KEY, body(images=0, messages=messages, max_tokens=1))
    worst = probe.json()["usage"]["prompt_tokens"] + LONG_MAX
    # Holding max_tokens alone, both would be let in: the prompts in flight would overshoot the budget.
    assert 2 * LONG_MAX <= EPSILON_BUDGET and worst <= EPSILON_BUDGET < 2 * worst

    # ignore_eos: the answer is all of max_tokens, so settled or held, the first spends its worst case.
    long = body(images=0, messages=messages, max_tokens=LONG_MAX, ignore_eos=True)
    first = post_chat(shared_server, key, {**long, "stream": True}, stream=True)
    assert first.status_code == 200, first.text
    assert int(first.headers["X-Quota-Remaining-Tokens"]) == EPSILON_BUDGET - worst
    next(first.iter_lines())  # under way: its worst case, prompt included, is held
    second = post_chat(shared_server, key, long)
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "quota_exceeded"
    assert int(second.headers["X-Quota-Remaining-Tokens"]) == EPSILON_BUDGET - worst
    first.close()  # the client hangs up mid-answer
    assert wait_for(lambda: usage_of(shared_server, "epsilon")["requests"] == 2, 60), "the cut one settled"

    # A request that fails after admission (an image that does not decode) holds nothing afterwards.
    broken = body(images=0)
    broken["messages"][0]["content"].insert(
        0, {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    )
    failed = post_chat(shared_server, key, broken)
    assert failed.status_code == 400, failed.text
    row = usage_of(shared_server, "epsilon")
    assert (row["requests"], row["errors"]) == (3, 2)

    # The budget left is exactly what was not spent: the cut answer's hold went back but for its tokens.
    spent = row["prompt_tokens"] + row["completion_tokens"]
    short = post_chat(shared_server, key, body(images=0))
    assert short.status_code == 200, short.text
    held = short.json()["usage"]["prompt_tokens"] + MAX_TOKENS
    assert int(short.headers["X-Quota-Remaining-Tokens"]) == EPSILON_BUDGET - spent - held


def test_several_choices_count_every_choices_tokens_and_the_prompt_once(shared_server: LiveServer) -> None:
    key, spent = "sk-eta-0007", {"prompt_tokens": 0, "completion_tokens": 0}
    for n, images, stream in ((1, 1, False), (3, 0, False), (3, 1, True), (1, 0, True)):
        payload = body(images=images, n=n)
        if stream:
            payload.update(stream=True, stream_options={"include_usage": True})
        response = post_chat(shared_server, key, payload, stream=stream)
        assert response.status_code == 200, response.text
        usage = streamed_usage(response) if stream else response.json()["usage"]
        for field in spent:
            spent[field] += usage[field]
    row = usage_of(shared_server, "eta")
    assert row["requests"] == 4
    assert {field: row[field] for field in spent} == spent

    # At admission an n=3 request holds its prompt once and max_tokens for each choice.
    last = post_chat(shared_server, key, body(images=0, n=3))
    assert last.status_code == 200, last.text
    held = last.json()["usage"]["prompt_tokens"] + 3 * MAX_TOKENS
    assert int(last.headers["X-Quota-Remaining-Tokens"]) == ETA_BUDGET - sum(spent.values()) - held


def test_the_usage_command_prints_the_table(
    shared_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    requests.post(
        url := shared_server.url + "/v1/chat/completions", json=body(), headers=bearer(BETA_KEY), timeout=120
    )
    assert url
    assert cli_main(["usage", "--server", shared_server.url, "--key", ADMIN_KEY]) == 0
    out = capsys.readouterr().out
    header, *lines = out.splitlines()
    assert header.split() == [
        "day",
        "key",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "image_tokens",
        "images",
        "errors",
    ]
    assert any(line.split()[1] == "beta" for line in lines)
    assert cli_main(["usage", "--server", shared_server.url, "--key", BETA_KEY]) == 1
    assert "admin_required" in capsys.readouterr().err


def test_counting_per_worker_is_warned_at_start(
    make_app: Callable[..., Flask], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS_TOML)
    with caplog.at_level("WARNING", logger="glmvision"):
        make_app(api_keys_file=str(keys))
    assert any("PER WORKER PROCESS" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="glmvision"):
        make_app(api_keys="sk-plain")  # no named keys: nothing is counted, nothing to warn about
    assert not any("PER WORKER PROCESS" in record.getMessage() for record in caplog.records)


def test_the_audit_log_carries_the_keys_name_never_the_key(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    from glmvision.ops.audit import new_key, read_audit

    keys, audit, secret = tmp_path / "keys.toml", tmp_path / "audit.log", new_key()
    keys.write_text(KEYS_TOML)
    client = make_app(api_keys_file=str(keys), audit_log=str(audit), audit_key=secret).test_client()
    assert client.post("/v1/chat/completions", json=body(), headers=bearer(BETA_KEY)).status_code == 200
    records = list(read_audit(audit, secret))
    assert [entry["key_id"] for entry in records] == ["beta"]
    assert BETA_KEY not in str(records)
