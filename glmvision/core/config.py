"""Settings: typed, from `GLMVISION_*` environment variables, overridden by a mapping.

`Settings` is the app's; `ServerSettings` holds what only gunicorn reads (bind address, workers,
threads). Both are pydantic-settings models, so a value is parsed and range-checked once, at
start-up, and the rest of the code reads typed attributes.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PREFIX = "GLMVISION_"
log = logging.getLogger("glmvision")


# Set by glmvision's gunicorn config in the master: a directory of this server's that its workers share.
SHARED_DIR_ENV = "GLMV_SHARED_DIR"


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


# What GLMVISION_REDACT may name (glmvision.postprocess.redact has a pattern for each).
REDACT_KINDS = ("cn_id", "bank_card", "phone", "email")
# Settings that are gone, and what replaced them: named in the error rather than "unknown".
RETIRED = {
    "GLMVISION_LOG_CONTENT": "content is never logged in plain text; use GLMVISION_AUDIT_LOG with "
    "GLMVISION_AUDIT_KEY for an encrypted audit file",
}

CommaList = Annotated[list[str], NoDecode]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+)$")]
# A LoRA adapter's name: what follows `<model>:` in a request, so no ':' ',' '=' or spaces in it.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# PEFT's name for "no adapter" in a mixed batch: never an adapter's own.
BASE_ADAPTER = "__base__"


def parse_lora(value: str) -> dict[str, str]:
    """GLMVISION_LORA's `name=dir,name2=dir2` as {name: dir}; ValueError naming what is wrong."""
    adapters: dict[str, str] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, equals, path = (piece.strip() for piece in item.partition("="))
        if not equals or not path:
            raise ValueError(f"{item!r} is not name=directory")
        if not ADAPTER_NAME.fullmatch(name) or name == BASE_ADAPTER:
            raise ValueError(
                f"adapter name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                "or digit"
            )
        if name in adapters:
            raise ValueError(f"adapter name {name!r} given twice")
        adapters[name] = os.path.expanduser(path)
    return adapters


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class _Base(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, extra="forbid", frozen=True, validate_default=True, str_strip_whitespace=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        # Environment values often carry stray spaces (" 28 ", "a, b"): they never mean anything.
        return value.strip() if isinstance(value, str) else value

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable of a field: `max_queue` -> `GLMVISION_MAX_QUEUE`."""
        return PREFIX + field.upper()


class Settings(_Base):
    """The app's settings (everything but gunicorn's own)."""

    model: str = Field(
        "", description="Local directory or hub id of GLM-4.6V-Flash; empty serves the demo model."
    )
    model_id: str = Field(
        "", description="Model name reported to clients; empty derives it from GLMVISION_MODEL."
    )
    demo_cache: str = Field(
        "",
        description="Where the demo model is built; empty means $XDG_CACHE_HOME/glmvision "
        "(~/.cache/glmvision).",
    )
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N (auto picks CUDA when available).")
    dtype: Literal["auto", "bfloat16", "float16", "float32", "int8"] = Field(
        "auto", description="auto, bfloat16, float16, float32 or int8 (bitsandbytes)."
    )
    warmup: bool = Field(
        True, description="Load the model when a gunicorn worker starts, not on the first request."
    )
    load_timeout: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds a request waits for a model that is still loading.",
    )
    max_image_side: int = Field(
        2048, ge=28, le=16384, description="Longest image side after resizing (aspect ratio kept)."
    )
    # Pillow refuses anything over 2x its own 89.5 MP bomb limit before we could look.
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        le=178_956_970,
        description="Largest image (width x height) accepted, checked before decoding.",
    )
    max_prompt_chars: int = Field(16_000, gt=0, description="Longest prompt accepted, in characters.")
    max_prompt_tokens: int = Field(
        0,
        ge=0,
        description="Longest prompt accepted, in tokens after the chat template, image tokens included; "
        "0: the model's context minus the request's max_new_tokens (never more than that).",
    )
    max_messages: int = Field(256, gt=0, description="Most messages one chat completion request may carry.")
    max_json_depth: int = Field(
        64, ge=2, le=512, description="Deepest nesting of arrays and objects a request body may have."
    )
    max_new_tokens: int = Field(2048, gt=0, description="Largest max_new_tokens a request may ask for.")
    max_schema_bytes: int = Field(
        32_768, gt=0, description="Largest JSON schema (response_format, json_schema) accepted, in bytes."
    )
    grammar_timeout: float = Field(
        5.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds a JSON schema or tool list may take to compile into a grammar (400 "
        "schema_too_complex past it); as long again to wait for a free compiler (503 grammar_busy).",
    )
    grammar_workers: int = Field(
        2,
        ge=1,
        le=16,
        description="Grammar compiler processes per worker, started when needed (each ~0.3 GB of its "
        "own: xgrammar loads torch).",
    )
    grammar_cache_mb: float = Field(
        256.0,
        gt=0,
        allow_inf_nan=False,
        description="Compiled grammars a worker keeps, in MiB (least recent out).",
    )
    schema_max_depth: int = Field(
        32,
        gt=0,
        description="Deepest nesting of subschemas in a JSON schema (400 schema_too_complex above it).",
    )
    schema_max_repeat: int = Field(
        1000,
        gt=0,
        description="Largest repetition count in a JSON schema: a pattern's {n,m} (nested ones multiplied), "
        "minLength/maxLength, minItems/maxItems, minProperties/maxProperties.",
    )
    schema_max_properties: int = Field(
        500, gt=0, description="Most properties a JSON schema names, all its objects together."
    )
    schema_max_refs: int = Field(
        1000,
        gt=0,
        description="Most $refs met expanding a JSON schema inline (each recursion followed once).",
    )
    schema_max_shortest: int = Field(
        10_000,
        gt=0,
        description="Most JSON values in the shortest document of any part of a JSON schema (minItems and "
        "required properties multiply).",
    )
    default_max_new_tokens: int = Field(
        512, gt=0, description="max_new_tokens when a request gives none (capped by the above)."
    )
    max_body_mb: float = Field(
        20.0, gt=0, allow_inf_nan=False, description="Largest request body in MiB (413 above it)."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads for torch ops in a worker; 0 = auto: 1 for tiny models (like the "
        "demo), where "
        "threading only adds overhead, else torch's default.",
    )
    scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: requests join the running batch at the next decode step; static: a "
        "batch runs one generate() to its end before the next forms.",
    )
    engine: Literal["thread", "process"] = Field(
        "process",
        description="process: engine processes started by the gunicorn master (one per GPU) hold the model "
        "for every worker; thread: each worker loads the model and runs its engine in a thread (also "
        "what an app served without glmvision's gunicorn config does).",
    )
    engines: int = Field(
        0,
        ge=0,
        le=64,
        description="With GLMVISION_ENGINE=process: engine processes to start; 0 = one per visible GPU "
        "(one on CPU). More than the GPUs share them in turn.",
    )
    max_batch_size: int = Field(8, gt=0, description="Most requests generated for together.")
    batch_wait_ms: float = Field(
        25.0,
        ge=0,
        le=1000,
        description="Under load, how long a batch may wait to fill up (never when a request finds "
        "the model idle).",
    )
    max_batch_tokens: int = Field(
        16384,
        gt=0,
        description="KV-cache budget in tokens: rows x the longest row's prompt (images included) plus "
        "max_new_tokens; on a GPU also capped by the memory free after loading.",
    )
    max_prefill_tokens: int = Field(
        8192,
        gt=0,
        description="Continuous scheduler: prompt tokens (images included) prefilled between two decode "
        "steps; one newcomer always fits.",
    )
    encoder_cache_mb: float = Field(
        -1.0,
        ge=-1,
        allow_inf_nan=False,
        description="Images kept prepared, in MiB, least recent out: the processor's output in each "
        "worker, the vision tower's output in each engine. -1 sizes it per device (1024 on a GPU, 256 "
        "on the CPU); 0 turns both off.",
    )
    prefix_cache: bool = Field(
        True,
        description="Reuse the KV cache of a recent prompt's prefix (same system prompt, images and "
        "earlier turns); cached tokens share the KV budget and are evicted before a request waits.",
    )
    max_queue: int = Field(
        64,
        gt=0,
        description="Requests that may wait for the model beyond a running batch; the next one gets "
        "503 overloaded.",
    )
    queue_timeout: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="Seconds a request may wait for the model before 503."
    )
    request_timeout: float = Field(
        300.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds from arrival after which generation for a request stops (finish_reason "
        "length, or 504).",
    )
    max_images: int = Field(8, gt=0, description="Most images one request may carry (all turns together).")
    max_n: int = Field(
        8,
        ge=1,
        description="Most choices (`n`) one chat completion may ask for; each is a row of the batch.",
    )
    model_aliases: CommaList = Field(
        [], description="Other model names clients may ask for (comma-separated)."
    )
    image_url_domains: CommaList = Field(
        [],
        description="Hosts whose http(s) image URLs may be fetched (e.g. cdn.example.com, "
        "*.example.org, * for any); "
        "empty refuses URLs.",
    )
    image_url_allow_private: bool = Field(
        False, description="Allow image URLs that resolve to loopback/private/link-local/CGNAT addresses."
    )
    max_video_seconds: float = Field(
        300.0, gt=0, allow_inf_nan=False, description="Longest video accepted, in seconds (GLM-4.6V's limit)."
    )
    max_video_frames: int = Field(
        18_000,
        ge=2,
        description="Most frames decoded from one video (before sampling at 2 fps): a file whose frames "
        "outnumber it is refused, whatever its metadata claims.",
    )
    max_video_mb: float = Field(
        50.0, gt=0, allow_inf_nan=False, description="Largest video accepted (base64 or download), in MiB."
    )
    max_video_frame_pixels: int = Field(
        3840 * 2160, ge=1, description="Largest video frame (width x height) decoded."
    )
    max_video_pixels: int = Field(
        600 * 448 * 448,
        ge=1,
        description="Total pixels of the frames sampled from one video, after resizing (each frame is "
        "shrunk so that all of them fit).",
    )
    video_decode_timeout: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="Seconds one video's decoding may take."
    )
    image_url_max_mb: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="Largest image download in MiB."
    )
    image_url_timeout: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="Seconds one image download may take in all."
    )
    image_url_max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed per image URL.")
    api_keys: CommaList = Field(
        [], description="Comma-separated API keys; with none (and no file) auth is off."
    )
    api_keys_file: str = Field(
        "",
        description="File with one API key per line (# comments allowed), or named keys with quotas "
        "in a `.toml` file (see keys.md).",
    )
    usage_storage_uri: str = Field(
        "memory://",
        description="Per-key usage and quota counters: memory:// (per worker) or redis://host:port/db "
        "(shared by the workers).",
    )
    rate_limit: str = Field(
        "",
        description="Per key (else per client IP) limit, e.g. 60/minute; empty is no limit.",
        examples=["60/minute"],
    )
    ratelimit_storage_uri: str = Field(
        "memory://", description="Rate-limit counters: memory:// or redis://host:port."
    )
    empty_cache_fraction: float = Field(
        0.92,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Between batches, empty the CUDA cache when reserved memory exceeds this share "
        "of the GPU.",
    )
    ratelimit_fail: Literal["open", "closed"] = Field(
        "open",
        description="When the rate-limit storage is down: open serves (counting per worker), closed "
        "refuses with 503 ratelimit_unavailable.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Python log level for glmvision's own logger."
    )
    request_log: bool = Field(
        True, description="One JSON line per request on stderr: ids, sizes, tokens, timings; never content."
    )
    audit_log: str = Field(
        "",
        description="File of prompts and answers, encrypted with GLMVISION_AUDIT_KEY; empty keeps no "
        "content anywhere.",
    )
    # Secrets: a repr or a log line of the settings shows them as '**********'.
    audit_key: SecretStr = Field(
        SecretStr(""), description="Fernet key for the audit log (glmvision audit-keygen makes one)."
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    metrics_key: SecretStr = Field(
        SecretStr(""), description="Bearer key /metrics requires; empty leaves it open."
    )
    cache: bool = Field(
        True, description="Answer repeated deterministic requests (greedy or seeded) from a cache."
    )
    cache_uri: str = Field(
        "memory://", description="memory:// (an LRU per worker) or redis://host:port/db (shared)."
    )
    cache_ttl: float = Field(
        3600.0, gt=0, allow_inf_nan=False, description="Seconds a cached answer is kept."
    )
    cache_size: int = Field(1024, gt=0, description="Answers the in-process cache holds (least recent out).")
    cache_scope: Literal["key", "global"] = Field(
        "key",
        description="Whose cached answers a request may get: `key`, only those to its own API key; "
        "`global`, any key's (more hits, but one key learns what another asked).",
    )
    cache_phash_distance: int = Field(
        -1,
        ge=-1,
        le=64,
        description="Perceptual match: serve the answer of an image whose pHash is within this many "
        "bits; -1 = exact pixels only.",
    )
    responses_store_size: int = Field(
        1000,
        ge=0,
        description="Responses `/v1/responses` keeps for `previous_response_id` and `GET` (oldest out; "
        "shared by a server's workers, or by servers with GLMVISION_CACHE_URI=redis://); 0 = none are "
        "stored.",
    )
    responses_ttl: float = Field(
        3600.0, gt=0, allow_inf_nan=False, description="Seconds a stored `/v1/responses` response is kept."
    )
    trusted_proxies: str = Field(
        "",
        description="Proxies in front: a hop count, or their CIDRs (comma-separated); empty trusts no "
        "X-Forwarded-For.",
    )
    allowed_ips: CommaList = Field(
        [],
        description="Client CIDRs (IPv4/IPv6) allowed in; others get 403 (not /healthz); empty allows all.",
    )
    breaker_timeouts: int = Field(
        5, ge=0, description="Timeouts in a row after which a client gets 429 circuit_open; 0 = off."
    )
    breaker_cooldown: float = Field(
        600.0, gt=0, allow_inf_nan=False, description="Seconds an open circuit refuses its client."
    )
    breaker_storage_uri: str = Field(
        "memory://", description="Circuit-breaker state: memory:// or redis://host:port (shared)."
    )
    stall_seconds: float = Field(
        120.0,
        ge=0,
        allow_inf_nan=False,
        description="Watchdog: with work waiting and no model progress this long, the worker exits "
        "for gunicorn to replace; 0 = off.",
    )
    degrade: Literal["off", "shrink"] = Field(
        "off", description="off, or shrink: under a deep queue, serve smaller images and shorter answers."
    )
    degrade_queue_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Share of the admission capacity in use from which requests are degraded.",
    )
    degrade_image_side: int = Field(1024, ge=28, description="Longest image side of a degraded request.")
    degrade_max_new_tokens: int = Field(256, gt=0, description="max_new_tokens cap of a degraded request.")
    fallback_message: str = Field(
        "",
        description="Answer sent (finish_reason fallback) when the model is unavailable; empty "
        "sends the 503.",
    )
    redact: CommaList = Field(
        [],
        description="Mask in answers, all but the last 4 characters: cn_id, bank_card, phone, email.",
        examples=[["email", "phone"]],
    )
    moderation_url: str = Field(
        "",
        description="Full URL of an OpenAI-style moderation endpoint (POST {input} -> {results}); the "
        "prompt is checked before generation and the answer after, streamed in sentence-sized pieces.",
        examples=["http://127.0.0.1:9000/v1/moderations"],
    )
    moderation: str = Field(
        "",
        description="Or module:function, a Python callable for in-house rules (see docs/moderation.md); "
        "not with GLMVISION_MODERATION_URL.",
        examples=["mycompany.rules:moderate"],
    )
    moderation_key: SecretStr = Field(
        SecretStr(""), description="Bearer key the moderation endpoint requires; empty sends none."
    )
    moderation_images: bool = Field(
        False, description="Also send the request's images to moderation, as data URLs."
    )
    moderation_fail: Literal["open", "closed"] = Field(
        "closed",
        description="When moderation cannot answer (timeout, refused, bad reply): closed refuses with "
        "503 moderation_unavailable, open serves unchecked and logs it.",
    )
    moderation_timeout: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="Seconds one moderation check may take."
    )
    lora: str = Field(
        "",
        description="LoRA adapters (PEFT directories, as glmvision finetune writes) loaded on the base "
        "model: name=dir,name2=dir2; a request picks one with model <id>:<name> or adapter.",
        examples=["gauges=/adapters/gauges"],
    )
    backend: Literal["local", "openai"] = Field(
        "local",
        description="local: load the model in each worker; openai: load none and forward every "
        "generation to GLMVISION_UPSTREAM_URL (vLLM, SGLang or any OpenAI-compatible engine).",
    )
    upstream_url: str = Field(
        "",
        description="Base URL of the OpenAI-compatible engine, as OpenAI clients take it (http://host:8000/v1).",
    )
    upstream_model: str = Field(
        "", description="Model id sent upstream; empty takes the first id the upstream's /v1/models lists."
    )
    upstream_key: SecretStr = Field(
        SecretStr(""), description="Bearer key the upstream requires; empty sends none."
    )
    upstream_concurrency: int = Field(
        64, gt=0, description="Most requests one worker has in flight upstream at once (its connection pool)."
    )
    upstream_connect_timeout: float = Field(
        5.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds to connect to the upstream (capped by the request's time left).",
    )

    _split = field_validator(
        "model_aliases", "image_url_domains", "api_keys", "allowed_ips", "redact", mode="before"
    )(_split_commas)

    @field_validator("redact")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(REDACT_KINDS))
        if unknown:
            raise ValueError(f"unknown kind(s) {', '.join(unknown)}; known: {', '.join(REDACT_KINDS)}")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse_many  # flask-limiter's own parser, Flask-free

        try:
            if value:
                parse_many(value)
        except ValueError:
            raise ValueError("not N/unit (second, minute, hour or day; several joined by ;)") from None
        return value

    @field_validator("lora")
    @classmethod
    def _lora_pairs(cls, value: str) -> str:
        parse_lora(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _upstream_needs_url(self) -> Settings:
        if self.backend == "openai" and not self.upstream_url:
            raise ValueError("GLMVISION_BACKEND=openai needs GLMVISION_UPSTREAM_URL")
        if self.upstream_url and not self.upstream_url.startswith(("http://", "https://")):
            raise ValueError(f"GLMVISION_UPSTREAM_URL must be an http(s) URL, got {self.upstream_url!r}")
        if self.backend == "openai" and self.lora:
            raise ValueError(
                "GLMVISION_LORA loads adapters into the local model; with GLMVISION_BACKEND=openai the "
                "upstream serves its own (vLLM's --lora-modules) and <model>:<name> asks it for <name>"
            )
        return self

    @model_validator(mode="after")
    def _one_moderation(self) -> Settings:
        if self.moderation_url and self.moderation:
            raise ValueError("GLMVISION_MODERATION_URL and GLMVISION_MODERATION: set one or neither")
        if self.moderation_url and not self.moderation_url.startswith(("http://", "https://")):
            raise ValueError(f"GLMVISION_MODERATION_URL must be an http(s) URL, got {self.moderation_url!r}")
        if self.moderation and not re.fullmatch(r"[\w.]+:[\w.]+", self.moderation):
            raise ValueError(f"GLMVISION_MODERATION must be module:function, got {self.moderation!r}")
        return self

    @model_validator(mode="after")
    def _audit_needs_key(self) -> Settings:
        if bool(self.audit_log) != bool(self.audit_key.get_secret_value()):
            raise ValueError("GLMVISION_AUDIT_LOG and GLMVISION_AUDIT_KEY go together: set both or neither")
        return self

    @property
    def lora_adapters(self) -> dict[str, str]:
        """GLMVISION_LORA as {name: directory}, in the order given."""
        return parse_lora(self.lora)

    @property
    def admission_capacity(self) -> int:
        """Requests one worker holds at once (running + queued); the next is refused with 503."""
        return self.max_batch_size + self.max_queue


# Threads beyond the admitted requests: they answer probes and refusals while the model is busy.
SPARE_THREADS = 16


class ServerSettings(_Base):
    """What only gunicorn reads (deploy/gunicorn.conf.py)."""

    bind: str = Field("127.0.0.1:8080", description="gunicorn: address to listen on.")
    workers: int = Field(
        0,
        ge=0,
        le=256,
        description="gunicorn: HTTP worker processes; 0 = auto: half the CPU cores, 1 to 8 (with "
        "GLMVISION_ENGINE=thread 1, as each worker then holds a model copy).",
    )
    threads: int = Field(
        0,
        ge=0,
        description="gunicorn: threads per worker; 0 = auto: GLMVISION_MAX_BATCH_SIZE + "
        "GLMVISION_MAX_QUEUE + 16 "
        "spare, so every admitted request has a thread and probes and refusals never wait.",
    )
    timeout: int = Field(
        300, gt=0, description="gunicorn: seconds a silent worker may run before it is restarted."
    )

    def worker_processes(self, app: Settings, cpus: int | None) -> int:
        """gunicorn's worker count: as set, else from the CPU count (the engines hold the model)."""
        if self.workers:
            return self.workers
        if app.engine == "thread" and app.backend == "local":
            return 1
        return max(1, min(8, (cpus or 1) // 2))

    def worker_threads(self, app: Settings) -> int:
        """gunicorn's thread count: derived from the app's admission capacity, or checked against it."""
        needed = app.admission_capacity + 1
        if self.threads == 0:
            return app.admission_capacity + SPARE_THREADS
        if self.threads < needed:
            raise ConfigError(
                f"GLMVISION_THREADS={self.threads} is too few: "
                f"GLMVISION_MAX_BATCH_SIZE={app.max_batch_size} + "
                f"GLMVISION_MAX_QUEUE={app.max_queue} requests are admitted, each holding a "
                f"thread, so at least "
                f"{needed} are needed (0 derives {app.admission_capacity + SPARE_THREADS}); or "
                f"lower GLMVISION_MAX_QUEUE"
            )
        return self.threads


def _source(field: str, overrides: Mapping[str, Any]) -> str:
    env = PREFIX + field.upper()
    if env in overrides:
        return "overrides"
    return "environment" if env in os.environ else "default"


def _load(model: type[_Base], overrides: Mapping[str, Any]) -> Any:
    mine = {name[len(PREFIX) :].lower(): value for name, value in overrides.items() if _is_field(model, name)}
    try:
        return model(**mine)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if not first["loc"]:  # a rule across fields: its message names them
            raise ConfigError(first["msg"].removeprefix("Value error, ")) from None
        field = str(first["loc"][0])
        message = first["msg"].removeprefix("Value error, ")
        info = model.model_fields[field]
        secret = isinstance(info.default, SecretStr)
        value = "'***'" if secret else repr(first.get("input"))
        raise ConfigError(
            f"{PREFIX}{field.upper()} ({_source(field, overrides)}): {message}, got {value}"
            + ("" if secret else _example(field, info.examples[0] if info.examples else info.default))
        ) from None


def _example(field: str, value: Any) -> str:
    """`; e.g. GLMVISION_NAME=value` with a value that passes (the default, else the field's example)."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, list):
        value = ",".join(value)
    return f"; e.g. {PREFIX}{field.upper()}={value}" if value != "" else ""


def _is_field(model: type[_Base], name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX) :].lower() in model.model_fields


# Read by `glmvision ask` and `batch`, not the server: a shell may well set them beside it.
CLIENT_VARIABLES = {"GLMVISION_SERVER", "GLMVISION_KEY"}


def known_variables() -> set[str]:
    """Every `GLMVISION_*` variable the app or gunicorn reads."""
    return {PREFIX + name.upper() for model in (Settings, ServerSettings) for name in model.model_fields}


def unknown_variables(names: Iterable[str]) -> list[str]:
    """The `GLMVISION_*` names among `names` that no setting reads (typos, say)."""
    known = known_variables()
    return sorted(name for name in names if name.startswith(PREFIX) and name not in known)


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """The app's settings: defaults < `GLMVISION_*` environment < `overrides` (same names)."""
    overrides = dict(overrides or {})
    for name in sorted(set(overrides) | set(os.environ)):
        if name in RETIRED:
            raise ConfigError(f"{name} is no longer read: {RETIRED[name]}")
    unknown = sorted(name for name in unknown_variables(overrides) if not _is_field(ServerSettings, name))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    return _load(Settings, overrides)


def load_server_settings(overrides: Mapping[str, Any] | None = None) -> ServerSettings:
    """gunicorn's settings, from the same sources."""
    return _load(ServerSettings, dict(overrides or {}))


def warn_unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """Log a warning for each `GLMVISION_*` variable that nothing reads; return them."""
    names = os.environ if environ is None else environ
    unknown = [name for name in unknown_variables(names) if name not in CLIENT_VARIABLES]
    # Compared without the prefix, which every name shares and would make anything look close.
    known = sorted(name[len(PREFIX) :] for name in known_variables() | CLIENT_VARIABLES)
    for name in unknown:
        nearest = difflib.get_close_matches(name[len(PREFIX) :], known, n=1)
        hint = f"did you mean {PREFIX}{nearest[0]}?" if nearest else "a typo?"
        log.warning("%s is not a glmvision setting and is ignored (%s)", name, hint)
    return unknown


def is_toml(path: str) -> bool:
    """Whether the keys file at `path` is in the TOML form (named keys), by its name."""
    return path.lower().endswith(".toml")


def read_api_keys(settings: Settings) -> list[str]:
    """Return the configured API keys from GLMVISION_API_KEYS and GLMVISION_API_KEYS_FILE."""
    keys = list(settings.api_keys)
    path = settings.api_keys_file
    if path and not is_toml(path):  # the TOML form's keys are named: glmvision.core.keys reads them
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise ConfigError(f"GLMVISION_API_KEYS_FILE: cannot read {path}: {exc.strerror}") from None
        keys.extend(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return keys


def _plain(default: Any) -> Any:
    return default.get_secret_value() if isinstance(default, SecretStr) else default


def settings_table() -> list[tuple[str, Any, str]]:
    """(variable, default, meaning) for every setting, app first, then gunicorn's."""
    return [
        (PREFIX + name.upper(), _plain(field.default), field.description or "")
        for model in (Settings, ServerSettings)
        for name, field in model.model_fields.items()
    ]


# Settings whose values are secret though not SecretStr (a list of them): `glmvision config` masks them too.
SECRET_LISTS = frozenset({"api_keys"})
MASK = "***"


@dataclass(frozen=True)
class SettingDoc:
    """One setting as docs/configuration.md and `glmvision config --env-template` describe it."""

    variable: str
    model: str  # "app" (Settings) or "gunicorn" (ServerSettings)
    type: str
    default: str  # as an environment value
    allowed: str  # range or choices; empty when any value of the type goes
    secret: bool
    description: str


def env_value(value: Any) -> str:
    """A setting's value as its environment variable would spell it (lists comma-joined, true/false)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def _is_secret(name: str, field: FieldInfo) -> bool:
    return field.annotation is SecretStr or name in SECRET_LISTS


def _type_and_allowed(field: FieldInfo) -> tuple[str, str]:
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return "str", "one of " + ", ".join(str(choice) for choice in get_args(annotation))
    if annotation is SecretStr:
        kind = "str (secret)"
    elif get_origin(annotation) is list:
        kind = "list (comma-separated)"
    else:
        kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    bounds = {
        name: getattr(item, name)
        for item in field.metadata
        for name in ("ge", "gt", "le", "lt")
        if getattr(item, name, None) is not None
    }
    patterns = [item.pattern for item in field.metadata if getattr(item, "pattern", None)]
    if "ge" in bounds and "le" in bounds:
        allowed = [f"{bounds['ge']} to {bounds['le']}"]
    else:
        signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        allowed = [f"{signs[name]} {bound}" for name, bound in bounds.items()]
    allowed += [f"matches {pattern}" for pattern in patterns]
    return kind, " and ".join(allowed)


def setting_docs() -> list[SettingDoc]:
    """Every setting, app first then gunicorn's, in declaration order, described from its Field."""
    docs = []
    for label, model in (("app", Settings), ("gunicorn", ServerSettings)):
        for name, field in model.model_fields.items():
            kind, allowed = _type_and_allowed(field)
            docs.append(
                SettingDoc(
                    variable=PREFIX + name.upper(),
                    model=label,
                    type=kind,
                    default=env_value(field.get_default(call_default_factory=True)),
                    allowed=allowed,
                    secret=_is_secret(name, field),
                    description=field.description or "",
                )
            )
    return docs


def effective_values(app: Settings, server: ServerSettings) -> list[tuple[str, str]]:
    """(variable, value) for every setting as loaded; a secret that is set shows as MASK."""
    values = []
    for settings in (app, server):
        for name, field in type(settings).model_fields.items():
            value = env_value(getattr(settings, name))
            if _is_secret(name, field) and value:
                value = MASK
            values.append((PREFIX + name.upper(), _without_password(value)))
    return values


def _without_password(value: str) -> str:
    # A redis:// or upstream URL may carry a password (scheme://user:password@host): mask it.
    return re.sub(r"(?<=://)([^/@\s:]*):[^/@\s]+@", rf"\1:{MASK}@", value)
