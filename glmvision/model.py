"""The model: loaded once per worker process, on first use or by warm-up, and run under a lock."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine
from .errors import APIError, bad_request, unavailable
from .generation import GenerationParams, GenerationStream
from .output import MARKERS

log = logging.getLogger("glmvision")

DEMO_MODEL_ID = "glm-4.6v-flash-demo"
_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def is_demo(source: str) -> bool:
    """True for the built-in demo model: no source configured, or a directory the builder wrote."""
    from .demo import DEMO_MARKER

    return not source or os.path.exists(os.path.join(source, DEMO_MARKER))


def model_id_for(source: str, configured: str) -> str:
    """Return the model name clients see, the same before and after loading."""
    if configured:
        return configured
    if is_demo(source):
        return DEMO_MODEL_ID
    return os.path.basename(os.path.normpath(source)) if os.path.isdir(source) else source


@dataclass
class LoadedModel:
    """A processor + model pair on one device, safe to share between a worker's threads."""

    processor: Any
    model: Any
    model_id: str
    device: str
    dtype: str
    demo: bool
    load_seconds: float
    engine: Engine | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        for token in _STOP_TOKENS:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
                ids.append(token_id)
        self.stop_ids: list[int] = ids
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
        # Control tokens to drop from answers; the think/box markers are handled by glmvision.output.
        self._noise = [t for t in tokenizer.all_special_tokens if t and t not in MARKERS]

    def info(self) -> dict[str, Any]:
        """Describe the loaded model for /v1/models."""
        return {"id": self.model_id, "demo": self.demo, "device": self.device, "dtype": self.dtype}

    def prepare(self, messages: list[dict[str, Any]], enable_thinking: bool, param: str = "image") -> Any:
        """Build model inputs from chat messages holding PIL images (runs outside the generation lock)."""
        try:
            return self.processor.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                sanitize_control_tokens=True,
                enable_thinking=enable_thinking,
            )
        except ValueError:
            # The processor validates images (e.g. aspect ratio); that is the client's input.
            log.info("processor refused an image", exc_info=log.isEnabledFor(logging.DEBUG))
            raise bad_request("image_rejected", "The model's processor refused an image.", param) from None

    def fit_image(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) this model's image processor resizes an image of that size to."""
        processor = self.processor.image_processor
        smart_resize = getattr(sys.modules[type(processor).__module__], "smart_resize", None)
        if smart_resize is None:
            return width, height

        def resize(w: int, h: int) -> tuple[int, int]:
            new_height, new_width = smart_resize(
                num_frames=processor.temporal_patch_size,
                height=h,
                width=w,
                temporal_factor=processor.temporal_patch_size,
                factor=processor.patch_size * processor.merge_size,
                min_pixels=processor.size["shortest_edge"],
                max_pixels=processor.size["longest_edge"],
            )
            return int(new_width), int(new_height)

        try:
            fitted = resize(width, height)
            # Very thin images hit the minimum side and would shrink again: leave those to the processor.
            return fitted if resize(*fitted) == fitted else (width, height)
        except (ValueError, KeyError, TypeError, AttributeError):
            return width, height  # the processor will speak for itself

    def decode(self, token_ids: list[int]) -> str:
        """Decode generated ids to text, dropping control tokens but keeping think/box markers."""
        text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=False)
        for token in self._noise:
            text = text.replace(token, "")
        return text

    def stream(self, inputs: Any, params: GenerationParams, arrived: float) -> GenerationStream:
        """Queue prepared inputs with the engine; iterate the stream for deltas."""
        assert self.engine is not None, "the holder attaches the engine after loading"
        return self.engine.submit(inputs, params, arrived)


def release_cuda_cache() -> None:
    """Return cached CUDA blocks to the driver, if CUDA is in use."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def load_model(settings: Mapping[str, Any]) -> LoadedModel:
    """Load processor and model as configured: real weights, or the demo model when none are set."""
    import torch
    import transformers

    from .demo import ensure_demo_model
    from .hardware import choose_dtype, resolve_device, weight_bytes_16bit

    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    source = settings["GLMVISION_MODEL"]
    if not source:
        cache = settings["GLMVISION_DEMO_CACHE"] or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "glmvision"
        )
        source = str(ensure_demo_model(cache))
    demo = is_demo(source)
    if demo:
        log.warning(
            "SERVING THE DEMO MODEL (%s): random weights, answers are meaningless. "
            "Set GLMVISION_MODEL to real GLM-4.6V-Flash weights.",
            source,
        )
    cuda = torch.cuda.is_available()
    device = resolve_device(settings["GLMVISION_DEVICE"], cuda, torch.cuda.device_count() if cuda else 0)
    free_vram = bf16_ok = None
    if device.startswith("cuda"):
        free_vram, _ = torch.cuda.mem_get_info(torch.device(device))
        bf16_ok = torch.cuda.is_bf16_supported()
    choice = choose_dtype(
        settings["GLMVISION_DTYPE"],
        device=device,
        bf16_supported=bool(bf16_ok),
        free_vram_bytes=free_vram,
        bf16_weight_bytes=weight_bytes_16bit(source),
        int8_available=_has_bitsandbytes(),
    )
    kwargs: dict[str, Any] = {}
    if choice.dtype == "int8":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.float16
    else:
        kwargs["dtype"] = getattr(torch, choice.dtype)
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        processor = transformers.AutoProcessor.from_pretrained(source)
        model = transformers.AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise RuntimeError(f"cannot load model from {source!r}: {exc}") from exc
    model.eval()
    threads = torch_threads(settings["GLMVISION_TORCH_THREADS"], sum(p.numel() for p in model.parameters()))
    if threads:
        torch.set_num_threads(threads)
    processor.tokenizer.padding_side = "left"
    model_id = model_id_for(source, settings["GLMVISION_MODEL_ID"])
    loaded = LoadedModel(
        processor=processor,
        model=model,
        model_id=model_id,
        device=device,
        dtype=choice.dtype,
        demo=demo,
        load_seconds=time.perf_counter() - started,
    )
    log.info(
        "model loaded: id=%s device=%s dtype=%s (%s) torch threads=%d in %.2fs pid=%d",
        model_id,
        device,
        choice.dtype,
        choice.reason,
        torch.get_num_threads(),
        loaded.load_seconds,
        os.getpid(),
    )
    return loaded


TINY_MODEL_PARAMETERS = 100_000_000


def torch_threads(configured: int, parameters: int) -> int:
    """Threads to give torch (0: leave its default): tiny models run fastest on one."""
    if configured:
        return configured
    # Intra-op threads only pay off for big matrices; for a tiny model they are synchronisation
    # overhead that also takes a core from the request threads' preprocessing.
    return 1 if parameters < TINY_MODEL_PARAMETERS else 0


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


class ModelHolder:
    """Lazily loads one model per process; threads wait for a load in progress, up to a timeout."""

    RETRY_AFTER_FAILURE = 30.0

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._settings = dict(settings)
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._failed_at: float | None = None
        self.error: str | None = None
        self.loading = False
        self._arriving = 0
        self._arriving_lock = threading.Lock()

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as being preprocessed, so the engine can wait a moment to batch it."""
        if self._loaded is not None and self._loaded.engine is not None:
            self._loaded.engine.check_capacity()  # full: refuse before decoding anything
        with self._arriving_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def get(self, timeout: float | None = None) -> LoadedModel:
        """Return the model, loading it now if needed; 503 if it cannot be had in time."""
        if self._loaded is not None:
            return self._loaded
        wait = self._settings["GLMVISION_LOAD_TIMEOUT"] if timeout is None else timeout
        if not self._lock.acquire(timeout=wait):
            raise unavailable("model_loading", "The model is still loading; retry shortly.", 10)
        try:
            if self._loaded is not None:
                return self._loaded
            if self._failed_at and time.monotonic() - self._failed_at < self.RETRY_AFTER_FAILURE:
                raise unavailable("model_unavailable", "The model failed to load; see the server log.", 30)
            self.loading = True
            try:
                loaded = load_model(self._settings)
                loaded.engine = Engine(loaded, self._settings, arriving=lambda: self._arriving)
                self._loaded, self.error = loaded, None
            except APIError:
                raise
            except Exception as exc:  # reported as 503, logged in full
                self._failed_at = time.monotonic()
                self.error = type(exc).__name__
                log.exception("model failed to load")
                raise unavailable(
                    "model_unavailable", "The model failed to load; see the server log.", 30
                ) from None
            finally:
                self.loading = False
            return self._loaded
        finally:
            self._lock.release()

    def warm_up(self) -> threading.Thread:
        """Start loading in a background thread (gunicorn calls this in each new worker)."""

        def run() -> None:
            try:
                self.get(timeout=0)
            except APIError:
                pass  # already logged; requests will see 503 and the next one retries

        thread = threading.Thread(target=run, name="glmvision-warmup", daemon=True)
        thread.start()
        return thread


_holders: dict[tuple[Any, ...], ModelHolder] = {}
_holders_lock = threading.Lock()


def holder_for(settings: Mapping[str, Any]) -> ModelHolder:
    """Return this process's holder for the configured model (one model per process and config)."""
    key = (
        os.getpid(),
        settings["GLMVISION_MODEL"],
        settings["GLMVISION_MODEL_ID"],
        settings["GLMVISION_DEMO_CACHE"],
        settings["GLMVISION_DEVICE"],
        settings["GLMVISION_DTYPE"],
    )
    with _holders_lock:
        holder = _holders.get(key)
        if holder is None:
            holder = _holders[key] = ModelHolder(settings)
        return holder
