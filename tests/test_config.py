"""Settings: defaults < environment < overrides, parsing, validation and API keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from glmvision import create_app
from glmvision.config import SETTINGS, ConfigError, load_settings, read_api_keys


def test_defaults_cover_every_setting() -> None:
    """With nothing set, every setting has its default and nothing else is returned."""
    settings = load_settings({}, {})
    assert settings == {setting.env: setting.default for setting in SETTINGS}
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
    """Without an explicit environ, os.environ is read."""
    monkeypatch.setenv("GLMVISION_THREADS", "9")
    assert load_settings()["GLMVISION_THREADS"] == 9
    assert load_settings(None, {})["GLMVISION_THREADS"] == 16


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
        ("LOG_CONTENT", "yes", True),
        ("LOG_CONTENT", "0", False),
        ("API_KEYS", "a, b ,c", ["a", "b", "c"]),
        ("API_KEYS", " one ", ["one"]),
        ("API_KEYS", "a,,b, ,", ["a", "b"]),
        ("API_KEYS", "", []),
        ("DEVICE", "cuda:1", "cuda:1"),
        ("DEVICE", "cpu", "cpu"),
        ("DTYPE", "int8", "int8"),
        ("LOG_LEVEL", "debug", "debug"),
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
    ("LOG_CONTENT", "2"),
    ("LOAD_TIMEOUT", "-1"),
    ("LOAD_TIMEOUT", "0"),
    ("LOAD_TIMEOUT", "inf"),
    ("MAX_BODY_MB", "inf"),
    ("MAX_BODY_MB", "nan"),
    ("WORKERS", "0"),
    ("THREADS", "-4"),
    ("TIMEOUT", "soon"),
    ("LOG_LEVEL", "verbose"),
]


@pytest.mark.parametrize(("name", "raw"), INVALID)
def test_invalid_environment_values_name_the_variable(name: str, raw: str) -> None:
    """A bad environment value is a ConfigError naming the variable and where it came from."""
    with pytest.raises(ConfigError, match=rf"^GLMVISION_{name} \(environment\)"):
        load_settings({}, {f"GLMVISION_{name}": raw})


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
    assert read_api_keys(load_settings(overrides, {})) == expected


def test_read_api_keys_from_environment(tmp_path: Path) -> None:
    """Both key sources work straight from environment strings."""
    path = tmp_path / "keys"
    path.write_text("file-key\n", encoding="utf-8")
    environ = {"GLMVISION_API_KEYS": " env-a ,env-b", "GLMVISION_API_KEYS_FILE": str(path)}
    assert read_api_keys(load_settings({}, environ)) == ["env-a", "env-b", "file-key"]


def test_read_api_keys_missing_file(tmp_path: Path) -> None:
    """A keys file that cannot be read is a ConfigError naming the setting and the path."""
    missing = tmp_path / "nope.txt"
    settings = load_settings({"GLMVISION_API_KEYS_FILE": str(missing)}, {})
    with pytest.raises(ConfigError, match="GLMVISION_API_KEYS_FILE") as info:
        read_api_keys(settings)
    assert str(missing) in str(info.value)


def _app_settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """Overrides for create_app that never load a model."""
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
    assert app.config["GLMVISION_RATE_LIMIT"] == rate
    assert (app.extensions["glmvision.limiter"] is None) == (rate == "")


def test_create_app_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """create_app layers the process environment under its overrides."""
    monkeypatch.setenv("GLMVISION_MAX_BODY_MB", "2")
    monkeypatch.setenv("GLMVISION_MAX_IMAGE_SIDE", "1000")
    app = create_app(_app_settings(tmp_path, max_image_side=700))
    assert app.config["GLMVISION_MAX_IMAGE_SIDE"] == 700
    assert app.config["MAX_CONTENT_LENGTH"] == 2 * 1024 * 1024


@pytest.mark.parametrize(("name", "raw"), [("DTYPE", "fp8"), ("MAX_BODY_MB", "inf"), ("LOAD_TIMEOUT", "inf")])
def test_create_app_rejects_bad_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    """A bad environment value is a ConfigError from create_app, not a crash elsewhere."""
    monkeypatch.setenv(f"GLMVISION_{name}", raw)
    with pytest.raises(ConfigError, match=f"GLMVISION_{name}"):
        create_app(_app_settings(tmp_path))
