"""A loaded processor + model pair: turns chat messages into inputs and generated ids into text."""

from __future__ import annotations

import copy
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from glmvision.backends.local.compiler import GrammarLimits
from glmvision.backends.local.grammar import GrammarBook
from glmvision.backends.local.imagecache import (
    CachingImageProcessor,
    ImageCache,
    cache_budget_bytes,
    digest_rows,
)
from glmvision.core.errors import bad_request, unavailable
from glmvision.core.images import PixelBudget
from glmvision.postprocess.pipeline import KEPT_TOKENS
from glmvision.postprocess.tools import control_token_key

if TYPE_CHECKING:
    from glmvision.backends.local.adapters import Adapters

log = logging.getLogger("glmvision")

_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of one token of the vocabulary, None when the tokenizer does not have it."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


class ProcessorPool:
    """Private copies of a processor, each used by one thread at a time, made as they are needed."""

    # A fast tokenizer keeps padding/truncation as state on its one Rust object and every encode
    # call resets it: threads sharing one tokenizer can encode with each other's settings (seen
    # here: wrong input_ids, silently) or fail with "Already borrowed" (transformers#47085).

    def __init__(self, processor: Any, size: int, wait: float, images: ImageCache | None = None) -> None:
        self._template = processor
        self._images = images if images is not None else ImageCache(0)
        self._size = size
        self._wait = wait
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._made = 0
        self._lock = threading.Lock()

    @contextmanager
    def checkout(self) -> Iterator[Any]:
        """A processor no other thread uses until the block ends; 503 after `wait` seconds."""
        processor = self._take()
        try:
            yield processor
        finally:
            self._idle.put(processor)

    def _take(self) -> Any:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            make = self._made < self._size
            self._made += make
        if make:
            # The template itself is never lent out: only copies encode, so it stays read-only.
            return self._copy()
        try:
            return self._idle.get(timeout=self._wait)
        except queue.Empty:
            raise unavailable("preprocessing_busy", "Input processors all busy; retry shortly.", 1) from None

    def _copy(self) -> Any:
        """A copy of the template whose image processor goes through the shared image cache."""
        processor = copy.deepcopy(self._template)
        if getattr(processor, "image_processor", None) is not None:
            processor.image_processor = CachingImageProcessor(processor.image_processor, self._images)
        return processor


def _video_metadata(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages without their videos' metadata, and the processor arguments that carry it: frames
    already sampled, each video's frame rate and frame numbers (the prompt's timestamps)."""
    from transformers.video_utils import VideoMetadata

    metadata: list[Any] = []
    cleaned: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(part.get("type") == "video" for part in content):
            parts = []
            for part in content:
                if part.get("type") == "video":
                    metadata.append(VideoMetadata(**part["video_metadata"]))
                    part = {"type": "video", "video": part["video"]}
                parts.append(part)
            message = {**message, "content": parts}
        cleaned.append(message)
    if not metadata:
        return messages, {}
    return cleaned, {"processor_kwargs": {"video_metadata": metadata, "do_sample_frames": False}}


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
    # As many copies as requests are prepared at once (see backend.Ticket.preparing): none waits.
    processor_copies: int = 4
    processor_wait: float = 30.0
    revision: str = ""  # identifies the weights (glmvision.backends.local.loading.model_revision)
    adapters: Adapters | None = None  # GLMVISION_LORA's, when set
    processors: ProcessorPool = field(init=False, repr=False)
    grammar_limits: GrammarLimits = field(default_factory=GrammarLimits)  # GLMVISION_GRAMMAR_*
    encoder_cache_mb: float = -1.0  # GLMVISION_ENCODER_CACHE_MB: bounds this worker's image cache
    image_cache: ImageCache = field(init=False, repr=False)
    _grammars: GrammarBook | None = field(default=None, init=False, repr=False)
    _grammar_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        for token in _STOP_TOKENS:
            token_id = _token_id(tokenizer, token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        self.stop_ids: list[int] = ids
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
        # Added tokens decode to their own text, apart from the bytes around them. Control tokens
        # decode to nothing; the think/box markers and tool-call tags are kept for the
        # post-processing stages (glmvision.postprocess.pipeline) that read them.
        noise = {t for t in tokenizer.all_special_tokens if t and t not in KEPT_TOKENS}
        self._added: dict[int, str] = {
            token_id: "" if token.content in noise else token.content
            for token_id, token in tokenizer.added_tokens_decoder.items()
        }
        self._control_tokens = tuple(token.content for token in tokenizer.added_tokens_decoder.values())
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode_run: Callable[[list[int]], str]
        if backend is not None:
            # The Rust decode itself: the Python wrapper around it costs more than a short run.
            self._decode_run = partial(backend.decode, skip_special_tokens=False)
        else:
            self._decode_run = partial(tokenizer.decode, skip_special_tokens=False)
        self.image_cache = ImageCache(cache_budget_bytes(self.encoder_cache_mb, self.device))
        self.processors = ProcessorPool(
            self.processor, self.processor_copies, self.processor_wait, self.image_cache
        )

    def grammars(self) -> GrammarBook:
        """The grammar compiler for this tokenizer, made at the first constrained request."""
        with self._grammar_lock:
            if self._grammars is None:
                tokenizer = self.processor.tokenizer
                think_open, think_end = _token_id(tokenizer, "<think>"), _token_id(tokenizer, "</think>")
                think = None
                if think_open is not None and think_end is not None:
                    think = (think_open, think_end)
                vocab_size = int(self.model.config.get_text_config().vocab_size)
                self._grammars = GrammarBook(tokenizer, vocab_size, self.stop_ids, think, self.grammar_limits)
            return self._grammars

    def forward(self, adapters: list[str | None], **kwargs: Any) -> Any:
        """The model's forward on a batch whose rows use these adapters (None: the base model)."""
        if self.adapters is None:
            return self.model(**kwargs)
        return self.adapters.forward(adapters, **kwargs)

    def generate(self, adapters: list[str | None], **kwargs: Any) -> Any:
        """The model's generate() on a batch whose rows use these adapters (None: the base model)."""
        if self.adapters is None:
            return self.model.generate(**kwargs)
        return self.adapters.generate(adapters, **kwargs)

    def info(self) -> dict[str, Any]:
        """Describe the loaded model for /v1/models."""
        return {"id": self.model_id, "demo": self.demo, "device": self.device, "dtype": self.dtype}

    def prepare(
        self,
        messages: list[dict[str, Any]],
        enable_thinking: bool,
        param: str = "image",
        tools: tuple[dict[str, Any], ...] = (),
    ) -> Any:
        """Build model inputs from chat messages holding PIL images (runs outside the generation lock)."""
        self._check_keys(messages, tools)
        messages, videos = _video_metadata(messages)
        try:
            with self.processors.checkout() as processor:
                images = processor.image_processor
                digests: list[bytes] | None = getattr(images, "digests", None)
                if digests is not None:
                    digests.clear()
                inputs = processor.apply_chat_template(
                    messages,
                    tools=list(tools) or None,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                    sanitize_control_tokens=True,
                    enable_thinking=enable_thinking,
                    **videos,
                )
                # Each image's key, in prompt order, for the engine's caches: never a model input.
                grids = inputs.get("image_grid_thw")
                if digests and grids is not None and len(digests) == grids.shape[0]:
                    inputs["image_hashes"] = digest_rows(digests)
                return inputs
        except ValueError:
            # The processor validates images (e.g. aspect ratio); that is the client's input.
            log.info("processor refused an image", exc_info=log.isEnabledFor(logging.DEBUG))
            raise bad_request("image_rejected", "The model's processor refused an image.", param) from None

    def _check_keys(self, messages: list[dict[str, Any]], tools: tuple[dict[str, Any], ...]) -> None:
        """Refuse control tokens in the keys the template writes as they are (values are sanitised)."""
        tokens = self._control_tokens
        found = control_token_key(list(tools), tokens, "tools")
        for index, message in enumerate(messages):
            if found is None and "tool_calls" in message:
                found = control_token_key(message["tool_calls"], tokens, f"messages.{index}.tool_calls")
        if found is not None:
            where, key = found
            raise bad_request("invalid_value", f"The key {key!r} in {where!r} holds a control token.", where)

    @property
    def context_tokens(self) -> int:
        """The longest sequence (prompt and answer together) the language model takes."""
        return int(self.model.config.get_text_config().max_position_embeddings)

    def image_cache_stats(self) -> dict[str, int]:
        """The worker's image cache: entries, bytes, budget_bytes, hits, misses, evictions."""
        return self.image_cache.stats()

    def image_sizes(self, inputs: Any) -> list[tuple[int, int]]:
        """The (width, height) of each image as the processor handed it to the model."""
        grids = inputs.get("image_grid_thw")
        patch = self.processor.image_processor.patch_size
        return [] if grids is None else [(int(w) * patch, int(h) * patch) for _, h, w in grids.tolist()]

    def visual_tokens(self, inputs: Any) -> int:
        """Prompt tokens that stand for image and video patches (after the processor's patch merge)."""
        total = 0
        for key, part in (("image_grid_thw", "image_processor"), ("video_grid_thw", "video_processor")):
            grids = inputs.get(key)
            if grids is not None:
                merge = int(getattr(getattr(self.processor, part, None), "merge_size", 1) or 1)
                total += int(grids.prod(dim=-1).sum()) // (merge * merge)
        return total

    def fit_image(self, width: int, height: int, budget: PixelBudget | None = None, /) -> tuple[int, int]:
        """The (width, height) this model's image processor resizes an image of that size to; with a
        budget, the size within its bounds (pixels as width x height) that the processor keeps as it is."""
        processor = self.processor.image_processor
        smart_resize = getattr(sys.modules[type(processor).__module__], "smart_resize", None)
        if smart_resize is None:
            return width, height
        try:
            # The processor's limits count a still image once per temporal patch (GLM-V: twice).
            frames = int(processor.temporal_patch_size)
            least, most = int(processor.size["shortest_edge"]), int(processor.size["longest_edge"])
        except (KeyError, TypeError, AttributeError, ValueError):
            return width, height
        limits = (least, most)
        if budget is not None:
            low, high = budget.bounds(-(-least // frames), most // frames)
            limits = (low * frames, high * frames)

        def resize(w: int, h: int, pixels: tuple[int, int]) -> tuple[int, int]:
            new_height, new_width = smart_resize(
                num_frames=frames,
                height=h,
                width=w,
                temporal_factor=frames,
                factor=processor.patch_size * processor.merge_size,
                min_pixels=pixels[0],
                max_pixels=pixels[1],
            )
            return int(new_width), int(new_height)

        try:
            fitted = resize(width, height, limits)
            # Very thin images hit the minimum side and would shrink again: leave those to the processor.
            return fitted if resize(*fitted, (least, most)) == fitted else (width, height)
        except (ValueError, KeyError, TypeError, AttributeError):
            return width, height  # the processor will speak for itself

    def decode(self, token_ids: list[int]) -> str:
        """Decode generated ids to text, dropping control tokens but keeping think/box markers."""
        # Only decodes use this tokenizer (encoding goes through copies): decoding borrows it
        # read-only, so any number of threads may decode at once without a lock.
        decode = self._decode_run
        added = self._added
        parts: list[str] = []
        start = 0
        for at, token_id in enumerate(token_ids):
            if token_id in added:
                if start < at:
                    parts.append(decode(token_ids[start:at]))
                parts.append(added[token_id])
                start = at + 1
        if start < len(token_ids):
            parts.append(decode(token_ids[start:]))
        return "".join(parts)
