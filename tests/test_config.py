"""Settings: defaults < environment < overrides, parsing, validation and API keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from glmvision import create_app
from glmvision.core.config import (
    SPARE_THREADS,
    ConfigError,
    ServerSettings,
    Settings,
    load_server_settings,
    read_api_keys,
    settings_table,
    unknown_variables,
    warn_unknown_variables,
)
from glmvision.core.config import load_settings as _load_settings
from glmvision.web.state import app_state

SERVER_FIELDS = set(ServerSettings.model_fields)


def load_settings(overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Any:
    """Load with `environ` added to the environment, app and gunicorn settings merged by variable name."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (environ or {}).items():
            patch.setenv(name, value)
        app = _load_settings(overrides)
        server = load_server_settings(overrides)
    merged = {  # secrets compare by their value here
        Settings.env_name(k): v.get_secret_value() if isinstance(v, SecretStr) else v
        for k, v in app.model_dump().items()
    }
    merged.update({ServerSettings.env_name(k): v for k, v in server.model_dump().items()})
    return merged


def test_defaults_cover_every_setting() -> None:
    """With nothing set, every setting has its default and nothing else is returned."""
    settings = load_settings({}, {})
    assert settings == {name: default for name, default, _ in settings_table()}
    assert settings["GLMVISION_MAX_IMAGE_SIDE"] == 2048
    assert settings["GLMVISION_DEVICE"] == "auto"
    assert settings["GLMVISION_WARMUP"] is True
    assert settings["GLMVISION_API_KEYS"] == []


@pytest.mark.parametrize(
    ("environ", "overrides", "expected"),
    [
        ({}, {}, 2048),
        ({"GLMVISION_MAX_IMAGE_SIDE": "1024"}, {}, 1024),
        ({}, {"GLMVISION_MAX_IMAGE_SIDE": 512}, 512),
        ({"GLMVISION_MAX_IMAGE_SIDE": "1024"}, {"GLMVISION_MAX_IMAGE_SIDE": 512}, 512),
        ({"GLMVISION_MAX_IMAGE_SIDE": "1024"}, {"GLMVISION_MAX_IMAGE_SIDE": "640"}, 640),
    ],
)
def test_precedence(environ: dict[str, str], overrides: dict[str, Any], expected: int) -> None:
    """Overrides beat the environment, which beats the default."""
    assert load_settings(overrides, environ)["GLMVISION_MAX_IMAGE_SIDE"] == expected


def test_invalid_environment_is_ignored_when_overridden() -> None:
    """A bad environment value does not matter when an override replaces it."""
    settings = load_settings({"GLMVISION_DEVICE": "cpu"}, {"GLMVISION_DEVICE": "tpu"})
    assert settings["GLMVISION_DEVICE"] == "cpu"


def test_process_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """os.environ is read."""
    monkeypatch.setenv("GLMVISION_THREADS", "90")
    assert load_settings()["GLMVISION_THREADS"] == 90
    monkeypatch.delenv("GLMVISION_THREADS")
    assert load_settings(None, {})["GLMVISION_THREADS"] == 0


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("MAX_IMAGE_SIDE", "1024", 1024),
        ("MAX_IMAGE_SIDE", " 28 ", 28),
        ("MAX_IMAGE_PIXELS", "1000000", 1_000_000),
        ("WORKERS", "3", 3),
        ("LOAD_TIMEOUT", "2.5", 2.5),
        ("LOAD_TIMEOUT", "7", 7.0),
        ("MAX_BODY_MB", "0.5", 0.5),
        ("EMPTY_CACHE_FRACTION", "1", 1.0),
        ("EMPTY_CACHE_FRACTION", "0.25", 0.25),
        ("WARMUP", "1", True),
        ("WARMUP", "0", False),
        ("WARMUP", "true", True),
        ("WARMUP", "false", False),
        ("WARMUP", "yes", True),
        ("WARMUP", "no", False),
        ("WARMUP", "TRUE", True),
        ("WARMUP", " No ", False),
        ("METRICS", "yes", True),
        ("CACHE", "0", False),
        ("API_KEYS", "a, b ,c", ["a", "b", "c"]),
        ("API_KEYS", " one ", ["one"]),
        ("API_KEYS", "a,,b, ,", ["a", "b"]),
        ("API_KEYS", "", []),
        ("DEVICE", "cuda:1", "cuda:1"),
        ("DEVICE", "cpu", "cpu"),
        ("DTYPE", "int8", "int8"),
        ("LOG_LEVEL", "debug", "DEBUG"),
        ("RATE_LIMIT", "60/minute", "60/minute"),
        ("MODEL", "/models/glm", "/models/glm"),
    ],
)
def test_environment_strings_are_parsed(name: str, raw: str, expected: Any) -> None:
    """Env strings become ints, floats, bools and trimmed lists of the setting's type."""
    value = load_settings({}, {f"GLMVISION_{name}": raw})[f"GLMVISION_{name}"]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LOAD_TIMEOUT", 5, 5.0),
        ("MAX_BODY_MB", 1, 1.0),
        ("API_KEYS", ["x", "y"], ["x", "y"]),
        ("API_KEYS", "x, y", ["x", "y"]),
        ("WARMUP", "off", False),
        ("WARMUP", False, False),
    ],
)
def test_override_values_are_coerced(name: str, value: Any, expected: Any) -> None:
    """Overrides may be typed values or env-style strings; ints become floats where needed."""
    result = load_settings({f"GLMVISION_{name}": value}, {})[f"GLMVISION_{name}"]
    assert result == expected
    assert type(result) is type(expected)


INVALID = [
    ("MAX_IMAGE_SIDE", "abc"),
    ("MAX_IMAGE_SIDE", "2.5"),
    ("MAX_IMAGE_SIDE", "27"),
    ("MAX_IMAGE_SIDE", "16385"),
    ("MAX_IMAGE_PIXELS", "0"),
    ("DEVICE", "tpu"),
    ("DEVICE", "cuda:"),
    ("DEVICE", "cuda:x"),
    ("DEVICE", "CPU"),
    ("DTYPE", "fp8"),
    ("MAX_IMAGE_PIXELS", "200000000"),
    ("EMPTY_CACHE_FRACTION", "1.5"),
    ("EMPTY_CACHE_FRACTION", "0"),
    ("EMPTY_CACHE_FRACTION", "nan"),
    ("EMPTY_CACHE_FRACTION", "lots"),
    ("WARMUP", "maybe"),
    ("REQUEST_LOG", "2"),
    ("LOAD_TIMEOUT", "-1"),
    ("LOAD_TIMEOUT", "0"),
    ("LOAD_TIMEOUT", "inf"),
    ("MAX_BODY_MB", "inf"),
    ("MAX_BODY_MB", "nan"),
    ("WORKERS", "-1"),
    ("THREADS", "-4"),
    ("TIMEOUT", "soon"),
    ("LOG_LEVEL", "verbose"),
    ("SCHEDULER", "fifo"),
    ("MAX_PREFILL_TOKENS", "0"),
    ("RATE_LIMIT", "60"),
    ("RATE_LIMIT", "60 per fortnight"),
    ("REDACT", "passwords"),
    ("LORA", "gauges"),
]


@pytest.mark.parametrize(("name", "raw"), INVALID)
def test_invalid_environment_values_name_the_variable(name: str, raw: str) -> None:
    """A bad environment value is a ConfigError naming the variable and where it came from."""
    with pytest.raises(ConfigError, match=rf"^GLMVISION_{name} \(environment\)"):
        load_settings({}, {f"GLMVISION_{name}": raw})


@pytest.mark.parametrize(("name", "raw"), INVALID)
def test_an_invalid_setting_is_one_line_with_its_value_accepted_form_and_an_example_that_works(
    name: str, raw: str
) -> None:
    """`GLMVISION_X (environment): <accepted form>, got <value>; e.g. GLMVISION_X=<example>`."""
    with pytest.raises(ConfigError) as refused:
        load_settings({}, {f"GLMVISION_{name}": raw})
    message = str(refused.value)
    assert "\n" not in message and "Value error" not in message
    head, _, example = message.partition("; e.g. ")
    assert head.lower().endswith(f", got {raw!r}".lower()), message
    assert len(head) > len(f"GLMVISION_{name} (environment): , got {raw!r}") + 10, message  # the form
    variable, _, value = example.partition("=")
    assert variable == f"GLMVISION_{name}", message
    assert load_settings({}, {variable: value})[variable] is not None  # the example itself loads


@pytest.mark.parametrize(("name", "raw"), INVALID)
def test_invalid_override_values_name_the_variable(name: str, raw: str) -> None:
    """The same values given as overrides fail the same way."""
    with pytest.raises(ConfigError, match=rf"^GLMVISION_{name} \(overrides\)"):
        load_settings({f"GLMVISION_{name}": raw}, {})


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAX_IMAGE_SIDE", 20), ("EMPTY_CACHE_FRACTION", 2.0), ("LOAD_TIMEOUT", float("inf"))],
)
def test_invalid_typed_overrides(name: str, value: Any) -> None:
    """Typed overrides are range-checked too."""
    with pytest.raises(ConfigError, match=f"GLMVISION_{name}"):
        load_settings({f"GLMVISION_{name}": value}, {})


def test_unknown_override_is_an_error() -> None:
    """A misspelt GLMVISION_* override is refused, naming every unknown key."""
    with pytest.raises(ConfigError, match="GLMVISION_MAX_SIDE, GLMVISION_NOPE"):
        load_settings({"GLMVISION_NOPE": 1, "GLMVISION_MAX_SIDE": 5, "GLMVISION_WORKERS": 2}, {})


def test_other_override_keys_pass_through_silently() -> None:
    """Keys without the prefix (Flask's own, say) are neither errors nor settings."""
    settings = load_settings({"TESTING": True, "SECRET_KEY": "x"}, {})
    assert "TESTING" not in settings
    assert "SECRET_KEY" not in settings


@pytest.mark.parametrize(
    ("env_keys", "file_text", "expected"),
    [
        ([], None, []),
        (["k1", "k2"], None, ["k1", "k2"]),
        ([], "", []),
        ([], "only\n", ["only"]),
        (["k1"], "# a comment\n\nk2\n  k3  \n   # indented comment\n\t\nk4", ["k1", "k2", "k3", "k4"]),
        (["k1"], "k1\n", ["k1", "k1"]),
    ],
)
def test_read_api_keys(
    tmp_path: Path, env_keys: list[str], file_text: str | None, expected: list[str]
) -> None:
    """Keys from GLMVISION_API_KEYS come first, then the file's, without comments or blanks."""
    overrides: dict[str, Any] = {"GLMVISION_API_KEYS": ", ".join(env_keys)}
    if file_text is not None:
        path = tmp_path / "keys.txt"
        path.write_text(file_text, encoding="utf-8")
        overrides["GLMVISION_API_KEYS_FILE"] = str(path)
    assert read_api_keys(_load_settings(overrides)) == expected


def test_read_api_keys_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both key sources work straight from environment strings."""
    path = tmp_path / "keys"
    path.write_text("file-key\n", encoding="utf-8")
    monkeypatch.setenv("GLMVISION_API_KEYS", " env-a ,env-b")
    monkeypatch.setenv("GLMVISION_API_KEYS_FILE", str(path))
    assert read_api_keys(_load_settings({})) == ["env-a", "env-b", "file-key"]


def test_read_api_keys_missing_file(tmp_path: Path) -> None:
    """A keys file that cannot be read is a ConfigError naming the setting and the path."""
    missing = tmp_path / "nope.txt"
    settings = _load_settings({"GLMVISION_API_KEYS_FILE": str(missing)})
    with pytest.raises(ConfigError, match="GLMVISION_API_KEYS_FILE") as info:
        read_api_keys(settings)
    assert str(missing) in str(info.value)


def _app_settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """Overrides for create_app that never load a model."""
    (tmp_path / "model").mkdir(exist_ok=True)
    settings = {"GLMVISION_MODEL": str(tmp_path / "model"), "GLMVISION_DEVICE": "cpu"}
    settings.update({f"GLMVISION_{key.upper()}": value for key, value in extra.items()})
    return settings


@pytest.mark.parametrize("rate", ["lots", "60 per fortnight", "/minute"])
def test_create_app_rejects_a_bad_rate_limit(tmp_path: Path, rate: str) -> None:
    """An unparseable rate limit stops the app at creation."""
    with pytest.raises(ConfigError, match="GLMVISION_RATE_LIMIT"):
        create_app(_app_settings(tmp_path, rate_limit=rate))


@pytest.mark.parametrize("rate", ["", "60/minute", "10/second;100/hour"])
def test_create_app_accepts_good_rate_limits(tmp_path: Path, rate: str) -> None:
    """Valid limits, or none, build an app with the setting in its config."""
    app = create_app(_app_settings(tmp_path, rate_limit=rate))
    assert app_state(app).service.settings.rate_limit == rate
    assert (app_state(app).limiter is None) == (rate == "")


def test_create_app_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """create_app layers the process environment under its overrides."""
    monkeypatch.setenv("GLMVISION_MAX_BODY_MB", "2")
    monkeypatch.setenv("GLMVISION_MAX_IMAGE_SIDE", "1000")
    app = create_app(_app_settings(tmp_path, max_image_side=700))
    assert app_state(app).service.settings.max_image_side == 700
    assert app.config["MAX_CONTENT_LENGTH"] == 2 * 1024 * 1024


@pytest.mark.parametrize(("name", "raw"), [("DTYPE", "fp8"), ("MAX_BODY_MB", "inf"), ("LOAD_TIMEOUT", "inf")])
def test_create_app_rejects_bad_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    """A bad environment value is a ConfigError from create_app, not a crash elsewhere."""
    monkeypatch.setenv(f"GLMVISION_{name}", raw)
    with pytest.raises(ConfigError, match=f"GLMVISION_{name}"):
        create_app(_app_settings(tmp_path))


@pytest.mark.parametrize(
    ("threads", "batch", "queue", "expected"),
    [(0, 8, 64, 8 + 64 + SPARE_THREADS), (0, 2, 3, 5 + SPARE_THREADS), (73, 8, 64, 73), (200, 8, 64, 200)],
)
def test_gunicorn_threads_cover_every_admitted_request(
    threads: int, batch: int, queue: int, expected: int
) -> None:
    """0 derives the pool from batch + queue + spare; an explicit count at least that large is kept."""
    app = _load_settings({"GLMVISION_MAX_BATCH_SIZE": batch, "GLMVISION_MAX_QUEUE": queue})
    assert app.admission_capacity == batch + queue
    assert load_server_settings({"GLMVISION_THREADS": threads}).worker_threads(app) == expected


@pytest.mark.parametrize(("threads", "batch", "queue"), [(16, 8, 64), (72, 8, 64), (1, 1, 1)])
def test_too_few_gunicorn_threads_are_refused_naming_the_settings(
    threads: int, batch: int, queue: int
) -> None:
    """A pool that could not hold every admitted request would queue requests inside gunicorn."""
    app = _load_settings({"GLMVISION_MAX_BATCH_SIZE": batch, "GLMVISION_MAX_QUEUE": queue})
    with pytest.raises(ConfigError) as info:
        load_server_settings({"GLMVISION_THREADS": threads}).worker_threads(app)
    message = str(info.value)
    for name in ("GLMVISION_THREADS", "GLMVISION_MAX_BATCH_SIZE", "GLMVISION_MAX_QUEUE"):
        assert name in message
    assert f"at least {batch + queue + 1}" in message


def test_unknown_variables_are_found_and_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """A typo such as GLMVISION_WORKER is reported; real settings and other variables are not."""
    environ = {"GLMVISION_WORKER": "2", "GLMVISION_WORKERS": "2", "GLMVISION_MAX_QUEUE": "3", "HOME": "/"}
    environ |= {"GLMVISION_SERVER": "http://127.0.0.1:8080", "GLMVISION_KEY": "k"}  # the client commands'
    assert unknown_variables(environ) == ["GLMVISION_KEY", "GLMVISION_SERVER", "GLMVISION_WORKER"]
    with caplog.at_level("WARNING", logger="glmvision"):
        assert warn_unknown_variables(environ) == ["GLMVISION_WORKER"]
    assert "GLMVISION_WORKER is not a glmvision setting and is ignored (did you mean GLMVISION_WORKERS?)" in (
        caplog.text
    )


def test_an_unknown_variable_with_no_near_name_gets_no_suggestion(caplog: pytest.LogCaptureFixture) -> None:
    """Every name shares GLMVISION_, so only the rest is compared: nothing is near GLMVISION_ZZZZ."""
    with caplog.at_level("WARNING", logger="glmvision"):
        assert warn_unknown_variables({"GLMVISION_ZZZZ": "1", "GLMVISION_RATELIMIT": "5/minute"}) == [
            "GLMVISION_RATELIMIT",
            "GLMVISION_ZZZZ",
        ]
    assert "GLMVISION_ZZZZ is not a glmvision setting and is ignored (a typo?)" in caplog.text
    assert (
        "GLMVISION_RATELIMIT is not a glmvision setting and is ignored (did you mean GLMVISION_RATE_LIMIT?)"
        in (caplog.text)
    )


def test_gunicorn_settings_are_kept_apart_from_the_app() -> None:
    """The app's settings hold no gunicorn-only field, and the two sets do not overlap."""
    assert SERVER_FIELDS == {"bind", "workers", "threads", "timeout"}
    assert not SERVER_FIELDS & set(Settings.model_fields)
    assert not hasattr(_load_settings({}), "workers")


@pytest.mark.parametrize(
    ("workers", "engine", "backend", "cpus", "expected"),
    [
        (0, "process", "local", 2, 1),  # half the cores
        (0, "process", "local", 16, 8),
        (0, "process", "local", 64, 8),  # at most 8
        (0, "process", "local", None, 1),  # the CPU count unknown
        (0, "thread", "local", 16, 1),  # each worker would hold a model copy
        (0, "thread", "openai", 16, 8),  # no model in the workers
        (3, "thread", "local", 16, 3),  # as set
    ],
)
def test_worker_processes_default_from_the_cpu_count(
    workers: int, engine: str, backend: str, cpus: int | None, expected: int
) -> None:
    upstream = {"GLMVISION_UPSTREAM_URL": "http://127.0.0.1:9/v1"} if backend == "openai" else {}
    app = _load_settings({"GLMVISION_ENGINE": engine, "GLMVISION_BACKEND": backend, **upstream})
    assert load_server_settings({"GLMVISION_WORKERS": workers}).worker_processes(app, cpus) == expected
