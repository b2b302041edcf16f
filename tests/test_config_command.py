"""`glmvision config`: the effective settings, secrets masked, and a `.env` template that parses back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

from glmvision.core.config import known_variables

SETTING_LINE = re.compile(r"^(GLMVISION_[A-Z0-9_]+)=(.*)$")
TEMPLATE_LINE = re.compile(r"^# (GLMVISION_[A-Z0-9_]+)=(.*)$")


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any GLMVISION_* variable, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    return env | settings


def config(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The real command line: `python -m glmvision config ARGS`."""
    return subprocess.run(
        [sys.executable, "-m", "glmvision", "config", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def printed(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The GLMVISION_NAME=value lines of a run, as a dict; every stdout line must be one."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    matches = [SETTING_LINE.match(line) for line in lines]
    assert all(matches), [line for line, match in zip(lines, matches, strict=True) if not match]
    return {match.group(1): match.group(2) for match in matches if match}


def test_prints_every_setting_with_the_environments_values() -> None:
    values = printed(
        config(
            env=clean_env(GLMVISION_MAX_QUEUE="12", GLMVISION_MODEL_ALIASES=" a , b ", GLMVISION_WORKERS="3")
        )
    )
    assert set(values) == known_variables()
    assert values["GLMVISION_MAX_QUEUE"] == "12"
    assert values["GLMVISION_MODEL_ALIASES"] == "a,b"
    assert values["GLMVISION_WORKERS"] == "3"  # gunicorn's settings too
    assert values["GLMVISION_METRICS"] == "true"


def test_secrets_are_masked_and_never_printed() -> None:
    secrets = {
        "GLMVISION_API_KEYS": "sk-first-1111,sk-second-2222",
        "GLMVISION_METRICS_KEY": "metrics-secret-3333",
        "GLMVISION_UPSTREAM_KEY": "upstream-secret-4444",
        "GLMVISION_AUDIT_KEY": "audit-secret-5555",
        "GLMVISION_CACHE_URI": "redis://:redis-secret-6666@127.0.0.1:6379/0",
    }
    result = config(env=clean_env(GLMVISION_AUDIT_LOG="/tmp/audit.log", **secrets))
    values = printed(result)
    for secret in ("sk-first-1111", "sk-second-2222", "3333", "4444", "5555", "6666"):
        assert secret not in result.stdout + result.stderr
    for name in (
        "GLMVISION_API_KEYS",
        "GLMVISION_METRICS_KEY",
        "GLMVISION_UPSTREAM_KEY",
        "GLMVISION_AUDIT_KEY",
    ):
        assert values[name] == "***"
    assert values["GLMVISION_CACHE_URI"] == "redis://:***@127.0.0.1:6379/0"
    assert values["GLMVISION_AUDIT_LOG"] == "/tmp/audit.log"  # not a secret: shown
    empty = printed(config(env=clean_env()))
    assert empty["GLMVISION_METRICS_KEY"] == "" and empty["GLMVISION_API_KEYS"] == ""  # unset stays empty


def test_an_invalid_setting_is_one_line_and_exit_2() -> None:
    for name, value in (
        ("GLMVISION_MAX_QUEUE", "lots"),
        ("GLMVISION_WORKERS", "-1"),
        ("GLMVISION_DTYPE", "fp4"),
    ):
        result = config(env=clean_env(**{name: value}))
        assert result.returncode == 2, (name, result.stdout)
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"glmvision config: {name}") and repr(value) in result.stderr


def test_an_unknown_variable_is_named_on_stderr() -> None:
    result = config(env=clean_env(GLMVISION_MAX_QEUE="5"))
    assert "GLMVISION_MAX_QEUE" not in printed(result)
    assert "GLMVISION_MAX_QEUE is not a glmvision setting" in result.stderr


def test_env_template_names_every_setting_and_parses_back_to_the_defaults() -> None:
    result = config("--env-template", env=clean_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(line == "" or line.startswith("# ") for line in lines)  # changes nothing until edited
    uncommented = dict(match.groups() for line in lines if (match := TEMPLATE_LINE.match(line)))
    assert set(uncommented) == known_variables()
    for index, line in enumerate(lines):
        if TEMPLATE_LINE.match(line):  # each setting's line follows its description
            assert lines[index - 1].startswith("# ") and "default" in lines[index - 1]
    assert "one of auto, bfloat16, float16, float32, int8" in result.stdout  # a Literal's choices
    assert "28 to 16384" in result.stdout  # a ge/le range
    defaults = printed(config(env=clean_env()))
    assert printed(config(env=clean_env(**uncommented))) == defaults
    assert uncommented == defaults
