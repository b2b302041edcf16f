"""Settings: defaults, overridden by `GLMVISION_*` environment variables, then by a mapping."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "GLMVISION_"


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {raw!r}")


def _parse_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


@dataclass(frozen=True)
class Setting:
    """One `GLMVISION_*` variable: its type, default and what it does."""

    name: str
    default: Any
    parse: Callable[[str], Any]
    doc: str
    check: Callable[[Any], bool] = lambda value: True
    rule: str = ""

    @property
    def env(self) -> str:
        return PREFIX + self.name


def _positive(value: float) -> bool:
    # Not infinite either: an infinite timeout or body size overflows where it is used.
    return 0 < value < math.inf


SETTINGS: tuple[Setting, ...] = (
    Setting("MODEL", "", str, "Local directory or hub id of GLM-4.6V-Flash; empty serves the demo model."),
    Setting("MODEL_ID", "", str, "Model name reported to clients; empty derives it from GLMVISION_MODEL."),
    Setting("DEMO_CACHE", "", str, "Where the demo model is built; empty means ~/.cache/glmvision."),
    Setting(
        "DEVICE",
        "auto",
        str,
        "auto, cpu, cuda or cuda:N (auto picks CUDA when available).",
        lambda v: v in {"auto", "cpu", "cuda"} or (v.startswith("cuda:") and v[5:].isdigit()),
        "auto, cpu, cuda or cuda:N",
    ),
    Setting(
        "DTYPE",
        "auto",
        str,
        "auto, bfloat16, float16, float32 or int8 (bitsandbytes).",
        lambda v: v in {"auto", "bfloat16", "float16", "float32", "int8"},
        "auto, bfloat16, float16, float32 or int8",
    ),
    Setting(
        "WARMUP", True, _parse_bool, "Load the model when a gunicorn worker starts, not on the first request."
    ),
    Setting(
        "LOAD_TIMEOUT",
        60.0,
        float,
        "Seconds a request waits for a model that is still loading before 503.",
        _positive,
        "> 0",
    ),
    Setting(
        "MAX_IMAGE_SIDE",
        2048,
        int,
        "Longest image side after resizing (aspect ratio kept).",
        lambda v: 28 <= v <= 16384,
        "28..16384",
    ),
    Setting(
        "MAX_IMAGE_PIXELS",
        50_000_000,
        int,
        "Largest image (width x height) accepted, checked before decoding.",
        # Pillow refuses anything over 2x its own 89.5 MP bomb limit before we could look.
        lambda v: 0 < v <= 178_956_970,
        "1..178956970",
    ),
    Setting("MAX_PROMPT_CHARS", 16_000, int, "Longest prompt accepted, in characters.", _positive, "> 0"),
    Setting("MAX_NEW_TOKENS", 2048, int, "Largest max_new_tokens a request may ask for.", _positive, "> 0"),
    Setting(
        "DEFAULT_MAX_NEW_TOKENS",
        512,
        int,
        "max_new_tokens when a request gives none (capped by the above).",
        _positive,
        "> 0",
    ),
    Setting("MAX_BODY_MB", 20.0, float, "Largest request body in MiB (413 above it).", _positive, "> 0"),
    Setting(
        "TORCH_THREADS",
        0,
        int,
        "CPU threads for torch ops in a worker; 0 = auto: 1 for tiny models (like the demo), where "
        "threading only adds overhead, else torch's default.",
        lambda v: v >= 0,
        ">= 0",
    ),
    Setting("MAX_BATCH_SIZE", 8, int, "Most requests one generate() call serves together.", _positive, "> 0"),
    Setting(
        "BATCH_WAIT_MS",
        25.0,
        float,
        "Under load, how long a batch may wait to fill up (never when a request finds the model idle).",
        lambda v: 0 <= v <= 1000,
        "0..1000",
    ),
    Setting(
        "MAX_BATCH_TOKENS",
        16384,
        int,
        "Token budget of one batch: prompt tokens (images included) plus max_new_tokens, summed over rows.",
        _positive,
        "> 0",
    ),
    Setting(
        "MAX_QUEUE",
        64,
        int,
        "Requests that may wait for the model; beyond that 503 overloaded.",
        _positive,
        "> 0",
    ),
    Setting(
        "QUEUE_TIMEOUT", 30.0, float, "Seconds a request may wait for the model before 503.", _positive, "> 0"
    ),
    Setting(
        "REQUEST_TIMEOUT",
        300.0,
        float,
        "Seconds from arrival after which generation for a request stops (finish_reason length, or 504).",
        _positive,
        "> 0",
    ),
    Setting(
        "MAX_IMAGES", 8, int, "Most images one request may carry (all turns together).", _positive, "> 0"
    ),
    Setting("MODEL_ALIASES", [], _parse_list, "Other model names clients may ask for (comma-separated)."),
    Setting(
        "IMAGE_URL_DOMAINS",
        [],
        _parse_list,
        "Hosts whose http(s) image URLs may be fetched (e.g. cdn.example.com, *.example.org, * for any); "
        "empty refuses URLs.",
    ),
    Setting(
        "IMAGE_URL_ALLOW_PRIVATE",
        False,
        _parse_bool,
        "Allow image URLs that resolve to loopback/private/link-local/CGNAT addresses.",
    ),
    Setting("IMAGE_URL_MAX_MB", 10.0, float, "Largest image download in MiB.", _positive, "> 0"),
    Setting(
        "IMAGE_URL_TIMEOUT", 10.0, float, "Seconds one image download may take in all.", _positive, "> 0"
    ),
    Setting(
        "IMAGE_URL_MAX_REDIRECTS",
        3,
        int,
        "Redirects followed per image URL.",
        lambda v: 0 <= v <= 10,
        "0..10",
    ),
    Setting("API_KEYS", [], _parse_list, "Comma-separated API keys; with none (and no file) auth is off."),
    Setting("API_KEYS_FILE", "", str, "File with one API key per line (# comments allowed)."),
    Setting("RATE_LIMIT", "", str, "Per key (else per client IP) limit, e.g. 60/minute; empty is no limit."),
    Setting(
        "RATELIMIT_STORAGE_URI", "memory://", str, "Rate-limit counters: memory:// or redis://host:port."
    ),
    Setting(
        "EMPTY_CACHE_FRACTION",
        0.92,
        float,
        "Empty the CUDA cache after a request when reserved memory exceeds this share of the GPU.",
        lambda v: 0 < v <= 1,
        "0 < x <= 1",
    ),
    Setting("LOG_CONTENT", False, _parse_bool, "Log prompts and answers (off: only sizes and timings)."),
    Setting(
        "LOG_LEVEL",
        "INFO",
        str,
        "Python log level for glmvision's own logger.",
        lambda v: v.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
        "DEBUG, INFO, WARNING or ERROR",
    ),
    Setting("BIND", "127.0.0.1:8080", str, "gunicorn: address to listen on."),
    Setting("WORKERS", 1, int, "gunicorn: worker processes (each holds one model copy).", _positive, "> 0"),
    Setting(
        "THREADS", 16, int, "gunicorn: threads per worker (each waiting request holds one).", _positive, "> 0"
    ),
    Setting(
        "TIMEOUT",
        300,
        int,
        "gunicorn: seconds a silent worker may run before it is restarted.",
        _positive,
        "> 0",
    ),
)

SETTINGS_BY_ENV = {setting.env: setting for setting in SETTINGS}


def _coerce(setting: Setting, value: Any) -> Any:
    if isinstance(value, str) and setting.parse is not str:
        value = setting.parse(value)
    elif setting.parse is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Return every setting keyed by its `GLMVISION_*` name: default < environment < overrides."""
    environ = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    unknown = sorted(k for k in overrides if k.startswith(PREFIX) and k not in SETTINGS_BY_ENV)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        value: Any = list(setting.default) if isinstance(setting.default, list) else setting.default
        source = "default"
        if setting.env in environ:
            value, source = environ[setting.env], "environment"
        if setting.env in overrides:
            value, source = overrides[setting.env], "overrides"
        try:
            value = _coerce(setting, value)
        except ValueError as exc:
            raise ConfigError(f"{setting.env} ({source}): {exc}") from None
        if not setting.check(value):
            raise ConfigError(f"{setting.env} ({source}) must be {setting.rule}, got {value!r}")
        values[setting.env] = value
    return values


def read_api_keys(settings: Mapping[str, Any]) -> list[str]:
    """Return the configured API keys from GLMVISION_API_KEYS and GLMVISION_API_KEYS_FILE."""
    keys = list(settings["GLMVISION_API_KEYS"])
    path = settings["GLMVISION_API_KEYS_FILE"]
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise ConfigError(f"GLMVISION_API_KEYS_FILE: cannot read {path}: {exc.strerror}") from None
        keys.extend(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return keys
