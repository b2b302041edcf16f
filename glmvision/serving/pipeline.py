"""The request pipeline every endpoint shares: images -> cache or model -> answer.

A view parses its wire format into turns and `GenerationParams` (its request model's rules and
`to_generation_params`), admits a `RequestContext`, and calls `answer`; image loading, the response
cache, the fallback message, the backend and the audit record live here, deciding only from the
context they are given.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from glmvision.core.backend import Submission
from glmvision.core.config import Settings
from glmvision.core.errors import APIError, bad_request
from glmvision.core.generation import AnswerStream, Delta, Generation, GenerationParams
from glmvision.core.images import DecodedImage, Fit, PixelBudget, decode_image, open_image
from glmvision.core.lora import model_name
from glmvision.core.responses import GroundingBox, PromptTokensDetails, Usage
from glmvision.core.urlfetch import FetchPolicy, fetch_image, is_url
from glmvision.core.video import DecodedVideo, VideoLimits, decode_video, video_bytes
from glmvision.ops.record import ImageStat, RequestRecord
from glmvision.postprocess.pipeline import Boxes, Piece, redaction_pipeline
from glmvision.postprocess.stream import FixedStream
from glmvision.serving.context import RequestContext
from glmvision.serving.service import Service

if TYPE_CHECKING:
    from glmvision.postprocess.redact import Redactor
    from glmvision.serving.cache import CachedAnswer, CacheKey

log = logging.getLogger("glmvision")


@dataclass(frozen=True)
class ImageRef:
    """An image as the client sent it: base64, a data URL or an http(s) URL, and where; and the
    size it asked the image be seen at, if any."""

    source: str
    param: str
    budget: PixelBudget | None = None


@dataclass(frozen=True)
class VideoRef:
    """A video as the client sent it: base64, a data URL or an http(s) URL, and where."""

    source: str
    param: str


@dataclass(frozen=True)
class Turn:
    """One chat message: a role and its parts (text, or images once loaded)."""

    role: str
    parts: list[Any] = field(default_factory=list)
    # An assistant turn's calls, OpenAI-shaped with `arguments` as a dict; a tool turn's call id.
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ChatInput:
    """A validated request: the conversation with decoded images, and how to sample."""

    turns: list[Turn]
    params: GenerationParams

    @property
    def images(self) -> list[DecodedImage]:
        return [part for turn in self.turns for part in turn.parts if isinstance(part, DecodedImage)]

    @property
    def videos(self) -> list[DecodedVideo]:
        return [part for turn in self.turns for part in turn.parts if isinstance(part, DecodedVideo)]


def boxes_of(chat: ChatInput, text: str) -> list[GroundingBox]:
    """The answer's grounding boxes on the request's images, in the pixels the user sees."""
    return list(box_stage(chat).place(text))


def box_stage(chat: ChatInput) -> Boxes:
    """The boxes stage for this request's images (the newest question's count says where a box is)."""
    sizes = tuple((image.width, image.height) for image in chat.images)
    asked = next((turn for turn in reversed(chat.turns) if turn.role == "user"), None)
    carried = sum(isinstance(part, DecodedImage) for part in asked.parts) if asked is not None else 0
    return Boxes(sizes, carried)


def load_image(
    ref: ImageRef,
    settings: Settings,
    policy: FetchPolicy,
    fit: Fit | None = None,
    max_side: int | None = None,
) -> DecodedImage:
    """Decode one image from base64/data URL, or fetch it from an allowed http(s) URL."""
    limits = {"max_side": max_side or settings.max_image_side, "max_pixels": settings.max_image_pixels}
    if is_url(ref.source):
        raw = fetch_image(ref.source, policy, ref.param)
        return open_image(raw, param=ref.param, fit=fit, budget=ref.budget, **limits)
    return decode_image(ref.source, param=ref.param, fit=fit, budget=ref.budget, **limits)


def load_video(ref: VideoRef, settings: Settings, policy: FetchPolicy) -> DecodedVideo:
    """Decode one video from base64/data URL, or fetch it from an allowed http(s) URL (its own size cap)."""
    limits = VideoLimits.from_settings(settings)
    if is_url(ref.source):
        raw = fetch_image(ref.source, replace(policy, max_bytes=limits.max_bytes), ref.param, media="video")
    else:
        raw = video_bytes(ref.source, limits, ref.param)
    return decode_video(raw, limits, ref.param)


def _load_part(
    part: Any, settings: Settings, policy: FetchPolicy, fit: Fit | None, max_side: int | None
) -> Any:
    if isinstance(part, ImageRef):
        return load_image(part, settings, policy, fit, max_side)
    if isinstance(part, VideoRef):
        return load_video(part, settings, policy)
    return part


def load_turns(
    turns: list[Turn],
    settings: Settings,
    policy: FetchPolicy,
    fit: Fit | None = None,
    max_side: int | None = None,
) -> list[Turn]:
    """Check the image count, then decode every image in the conversation (in order)."""
    refs = _refs(turns)
    limit = settings.max_images
    if len(refs) > limit:
        raise bad_request(
            "too_many_images",
            f"The request has {len(refs)} images; at most {limit} are accepted.",
            "messages",
        )
    return [
        replace(
            turn,
            parts=[_load_part(p, settings, policy, fit, max_side) for p in turn.parts],
        )
        for turn in turns
    ]


def to_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    """Render turns in the processor's chat format, images as PIL images (never user strings)."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        if turn.role != "user":
            messages.append({"role": turn.role, "content": "\n".join(turn.parts), **_tool_fields(turn)})
            continue
        content = [_user_part(part) for part in turn.parts]
        messages.append({"role": "user", "content": content})
    return messages


def _tool_fields(turn: Turn) -> dict[str, Any]:
    """A turn's tool calls or tool call id, as message fields (none for other turns)."""
    fields: dict[str, Any] = {}
    if turn.tool_calls:
        fields["tool_calls"] = [dict(call) for call in turn.tool_calls]
    if turn.tool_call_id is not None:
        fields["tool_call_id"] = turn.tool_call_id
    return fields


def _user_part(part: Any) -> dict[str, Any]:
    if isinstance(part, DecodedImage):
        return _image_part(part)
    if isinstance(part, DecodedVideo):
        # Frames and their metadata, never a path or URL: the processor decodes nothing itself.
        return {"type": "video", "video": part.frames, "video_metadata": part.metadata()}
    return {"type": "text", "text": part}


def _image_part(image: DecodedImage) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "image", "image": image.image}
    if image.original is not None:
        part["original"] = (image.mime, image.original)  # an upstream engine may take these as they are
    if image.budget is not None and image.budget.detail is not None:
        part["detail"] = image.budget.detail  # OpenAI's, passed on to an upstream engine
    return part


def conversation(turns: list[Turn]) -> list[dict[str, Any]]:
    """The turns as plain data, images by position only: what the cache key and audit record hold."""
    return [
        {
            "role": turn.role,
            "parts": [_placeholder(p) for p in turn.parts],
            **_tool_fields(turn),
        }
        for turn in turns
    ]


def _placeholder(part: Any) -> Any:
    if isinstance(part, DecodedImage):
        return "<image>"
    if isinstance(part, DecodedVideo):
        return "<video>"
    return part


@dataclass
class Answer:
    """A generation under way (or known already): the model's name, its stream and what follows it."""

    model_id: str
    stream: AnswerStream
    started: float
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # as the model sees them
    arrived: float = 0.0  # the ticket's arrival (monotonic)
    record: RequestRecord = field(kw_only=True)  # filled for the request log and metrics, never read
    redactor: Redactor | None = None  # set only when it masks anything (Service.redacting)
    # Called once with the whole (unredacted) answer: the cache and the audit log.
    on_done: Callable[[Generation], None] | None = None
    # Choices 1..n-1 of a request for n (their records are copies: the request's is choice 0's).
    others: list[Answer] = field(default_factory=list)
    _result: Generation | None = None
    _head: Answer | None = None  # choice 0, for choices 1..n-1: its record counts every choice's tokens

    @property
    def choices(self) -> list[Answer]:
        """Every choice, in index order."""
        return [self, *self.others]

    def add_choices(self, others: list[Answer]) -> None:
        """Make `others` choices 1..n-1 of this request."""
        self.others = others
        for other in others:
            other._head = self

    def deltas(self, settings: Settings) -> Iterator[Delta]:
        """Yield deltas as they are generated (redacted if configured); log the outcome once done."""
        post = redaction_pipeline(self.redactor).stream()
        try:
            for delta in self.stream:
                shown = post.feed(Piece(delta.reasoning, delta.content))
                if shown.reasoning or shown.content or delta.logprobs:
                    yield Delta(shown.reasoning, shown.content, delta.logprobs)
            tail = post.finish()
            if tail.reasoning or tail.content:
                yield Delta(tail.reasoning, tail.content)
        except APIError as exc:
            self.record.code = exc.error_code
            raise
        finally:
            self._note()
        self._done(settings)

    def finish(self, settings: Settings, client_gone: Callable[[], bool] = lambda: False) -> Generation:
        """Wait for the whole answer; generation stops early if `client_gone()` turns true."""
        try:
            self.stream.whole(client_gone)
        finally:
            self._note()
        self._done(settings)
        return self.result

    @property
    def result(self) -> Generation:
        """The whole answer as the client gets it (redacted if configured)."""
        raw = self.stream.result
        assert raw is not None, "the stream has not ended"
        if self._result is None:
            shown = redaction_pipeline(self.redactor).whole(Piece(raw.reasoning or "", raw.text))
            reasoning = None if raw.reasoning is None else shown.reasoning
            self._result = replace(raw, text=shown.content, reasoning=reasoning)
        return self._result

    def _note(self) -> None:
        """Put tokens and timings in the request's record (also for a stream cut short); the request's
        completion tokens are every choice's, as its usage says (and a named key is charged)."""
        record, stream = self.record, self.stream
        record.prompt_tokens = stream.prompt_tokens
        record.completion_tokens = _generated(stream)
        head = self._head or self
        head.record.completion_tokens = sum(_generated(choice.stream) for choice in head.choices)
        if stream.started_at is not None:
            record.queue_s = max(0.0, stream.started_at - (stream.queued_at or stream.started_at))
            if stream.ended_at is not None:
                record.generate_s = stream.ended_at - stream.started_at
        if stream.first_token_at is not None and self.arrived:
            record.first_token_s = stream.first_token_at - self.arrived
        if stream.result is not None:
            record.finish_reason = stream.result.finish_reason

    def _done(self, settings: Settings) -> None:
        raw = self.stream.result
        assert raw is not None
        _log_generation(raw, time.perf_counter() - self.started)
        if self.redactor is not None:
            counts = {kind: n for kind, n in self.redactor.count(raw.text).items() if n}
            if counts:
                self.record.redactions = counts
        if self.on_done is not None:
            try:
                self.on_done(raw)
            except Exception:  # the answer is already the client's; bookkeeping failing must not change it
                log.exception("recording a finished answer failed")


def _generated(stream: AnswerStream) -> int:
    """The tokens a choice generated, so far if it has not ended."""
    finished = stream.result
    return len(stream.token_ids) if finished is None else finished.completion_tokens


def cacheable(params: GenerationParams) -> bool:
    """Only a deterministic request may be answered from the cache: greedy, or a fixed seed (and not
    one asking for logprobs, which a cached answer does not keep)."""
    return (params.temperature == 0 or params.seed is not None) and params.logprobs is None


def cache_revision(state: Service, params: GenerationParams) -> str | None:
    """The model revision to key a request's answer by; None when it must not be cached (no cache, a
    sampled request) or nothing would find it (no model loaded yet, so no revision to key by)."""
    if state.cache is None or not cacheable(params):
        return None
    return state.backend.capabilities().revision


def answer(
    context: RequestContext,
    turns: list[Turn],
    params: GenerationParams,
    image_param: str = "image",
    streamed: bool = False,
    n: int = 1,
) -> tuple[ChatInput, Answer]:
    """With the request's place taken (admit), decode the images, prepare the inputs and queue the
    generation; `streamed`: the caller reads deltas, not only the whole answer; `n`: choices (the
    response cache holds single answers, so n > 1 never meets it). With moderation configured, the
    prompt is checked first and every choice's text before it is read."""
    moderator = context.service.moderator
    if moderator is None:
        return _answer(context, turns, params, image_param, streamed, n)
    try:
        moderator.check_prompt(context, turns, image_param)
    except BaseException:
        context.held().release()
        raise
    chat, answered = _answer(context, turns, params, image_param, streamed, n)
    for choice in answered.choices:
        choice.stream = moderator.watch(choice.stream, context)
    return chat, answered


def _answer(
    context: RequestContext,
    turns: list[Turn],
    params: GenerationParams,
    image_param: str,
    streamed: bool,
    n: int,
) -> tuple[ChatInput, Answer]:
    state, record, ticket = context.service, context.record, context.held()
    settings, backend = state.settings, state.backend
    if context.degraded and params.max_new_tokens > settings.degrade_max_new_tokens:
        params = replace(params, max_new_tokens=settings.degrade_max_new_tokens)
    started = time.perf_counter()
    if state.quotas is not None:  # a named key's model list and daily budgets, before any decoding
        images = sum(isinstance(part, ImageRef) for turn in turns for part in turn.parts)
        state.quotas.admit(context.key, record, params, images, n)
    try:
        max_side = min(settings.max_image_side, settings.degrade_image_side) if context.degraded else None
        alias = _source_key(context, turns, params, max_side) if n == 1 else None
        remembered = _remembered(context, turns, params, alias)
        if remembered is not None:
            return remembered
        # Once the model is known, images go straight to the size its processor wants.
        fit = _image_fit(context, turns, ticket.deadline)
        chat = ChatInput(load_turns(turns, settings, state.fetch_policy, fit, max_side), params)
        record.images = [ImageStat(i.width, i.height, *i.resized_to) for i in chat.images]
        if state.moderator is not None:  # images fetched from URLs, checked as fetched (inline ones were)
            pairs = zip(chat.images, _refs(turns), strict=True)
            state.moderator.check_images(context, [i for i, ref in pairs if is_url(ref.source)], image_param)
        answered = _known_answer(context, chat, cached=n == 1)
        if answered is not None:
            answered.add_choices(_copies(context, chat, answered, n))
            return chat, answered
        try:
            on_prompt = _prompt_hold(context)
            submission = Submission(to_messages(chat.turns), params, image_param, streamed, n, on_prompt)
            prepared = backend.submit(submission, ticket)
            record.preprocess_s = prepared.prepared_at - started
            record.visual_tokens = prepared.visual_tokens
            stream = prepared.stream
        except APIError as exc:
            if not state.falls_back(exc.error_code):
                raise
            fallback = _fallback(context, chat)
            fallback.add_choices(_copies(context, chat, fallback, n))
            return chat, fallback
    except BaseException:
        ticket.release()
        raise
    # The key made at lookup, if any: one made now that the model has loaded would cover images
    # decoded before it knew their size, and no later request would ever find it.
    done = _after_answer(context, chat, context.cache_key, alias)
    others = [
        Answer(
            prepared.model_id,
            more,
            time.perf_counter(),
            prepared.image_sizes,
            ticket.arrived,
            record=replace(record),
            redactor=state.redacting,
        )
        for more in prepared.more
    ]
    answer = Answer(
        prepared.model_id,
        stream,
        time.perf_counter(),
        prepared.image_sizes,
        ticket.arrived,
        record=record,
        redactor=state.redacting,
        on_done=done,
    )
    answer.add_choices(others)
    return chat, answer


def _prompt_hold(context: RequestContext) -> Callable[[int], None] | None:
    """What holds the prompt's tokens against a named key's daily budget once they are known; None
    when nothing would."""
    quotas, key = context.service.quotas, context.key
    if quotas is None or key is None or key.tokens_per_day is None:
        return None
    return lambda tokens: quotas.hold_prompt(key, context.record, tokens)


def _refs(turns: list[Turn]) -> list[ImageRef]:
    return [part for turn in turns for part in turn.parts if isinstance(part, ImageRef)]


def _image_fit(context: RequestContext, turns: list[Turn], deadline: float) -> Fit | None:
    """The model's image fit. An image with its own pixel budget waits (until `deadline`, monotonic)
    for a model still loading: only here can it be fitted, the processor applies the server's bounds."""
    backend = context.service.backend
    fit = backend.capabilities().image_fit
    budgeted = any(
        isinstance(part, ImageRef) and part.budget is not None and not part.budget.is_default
        for turn in turns
        for part in turn.parts
    )
    if fit is not None or not budgeted:
        return fit
    if backend.health(probe=False).status == "not_loaded":
        backend.warm_up()
    deadline = min(deadline, time.monotonic() + context.settings.load_timeout)
    while backend.health(probe=False).status in ("loading", "not_loaded") and time.monotonic() < deadline:
        time.sleep(0.02)
    return backend.capabilities().image_fit


def _known_answer(context: RequestContext, chat: ChatInput, cached: bool = True) -> Answer | None:
    """The fallback when the model was unavailable at admission, or a cache hit (when `cached`); else None."""
    if context.fallback:
        return _fallback(context, chat)
    cache = context.service.cache
    key = _cache_key(context, chat) if cached else None
    if key is None or cache is None:
        return None
    hit = cache.get(key)
    context.record.cache = "miss" if hit is None else "hit"
    if hit is None:
        return None
    return _from_cache(context, chat, hit)


def _from_cache(context: RequestContext, chat: ChatInput, hit: CachedAnswer) -> Answer:
    hold = _prompt_hold(context)
    if hold is not None:  # the same budget as a generated answer's: its prompt counts
        hold(hit.prompt_tokens)
    generation = Generation(
        hit.text,
        hit.reasoning,
        hit.prompt_tokens,
        hit.completion_tokens,
        hit.finish_reason,
        cached_tokens=hit.cached_tokens,
        image_tokens=hit.image_tokens,
    )
    return _fixed(context, chat, generation)


def _copies(context: RequestContext, chat: ChatInput, known: Answer, n: int) -> list[Answer]:
    """Choices 1..n-1 of an answer known without the model (the fallback): the same answer again."""
    return [_fixed(context, chat, known.stream.whole(), first=False) for _ in range(n - 1)]


def _fixed(context: RequestContext, chat: ChatInput, generation: Generation, first: bool = True) -> Answer:
    """An answer known without the model (a cache hit, the fallback): the place goes back at once
    (with the first choice; the others record nothing)."""
    state, ticket = context.service, context.held()
    if first:
        ticket.release()
    return Answer(
        model_name(state.backend.capabilities().model_names[0], chat.params.adapter),
        FixedStream(generation),
        time.perf_counter(),
        _model_sizes(state, chat),
        ticket.arrived,
        record=context.record,
        redactor=state.redacting,
        on_done=_after_answer(context, chat, None) if first else None,
    )


def cache_scope(settings: Settings, key_id: str | None) -> str:
    """Whose answers a request may be given from the cache: its own API key's, or everyone's."""
    # Scoped by default: a shared cache tells one tenant what another asked (a hit is an oracle).
    if settings.cache_scope == "global":
        return "global"
    return f"key:{key_id}" if key_id else "anonymous"


def _source_key(
    context: RequestContext, turns: list[Turn], params: GenerationParams, max_side: int | None
) -> CacheKey | None:
    """A key over the images' bytes as sent, not their pixels: an exact repeat hits without decoding."""
    state = context.service
    revision = cache_revision(state, params)
    if revision is None:
        return None
    rendered: list[dict[str, Any]] = []
    for turn in turns:
        parts: list[str] = []
        for part in turn.parts:
            if isinstance(part, VideoRef):
                return None  # videos are not cached
            if isinstance(part, ImageRef):
                if is_url(part.source):
                    return None  # what a URL points at may change; its pixels decide
                budget = part.budget.key() if part.budget is not None else None
                parts.append(
                    "source:"
                    + hashlib.sha256(part.source.encode()).hexdigest()
                    + (f"@{budget}" if budget else "")
                )
            else:
                parts.append(part)
        rendered.append({"role": turn.role, "parts": parts, **_tool_fields(turn)})
    from glmvision.serving.cache import make_key

    limits = {
        "by": "source",
        "max_side": max_side or state.settings.max_image_side,
        "max_pixels": state.settings.max_image_pixels,
        "scope": cache_scope(state.settings, context.key_id),
    }
    return make_key(
        state.backend.capabilities().model_names[0],
        revision,
        [],
        rendered,
        {**asdict(params), **limits},
        False,
    )


def _remembered(
    context: RequestContext, turns: list[Turn], params: GenerationParams, alias: CacheKey | None
) -> tuple[ChatInput, Answer] | None:
    """An exact repeat's answer, found by its images' bytes (their sizes come from the cache too)."""
    cache = context.service.cache
    if alias is None or cache is None or context.fallback:
        return None
    hit = cache.get(alias)
    refs = [part for turn in turns for part in turn.parts if isinstance(part, ImageRef)]
    if hit is None or len(hit.images) != len(refs):
        return None
    sizes = iter(hit.images)
    chat = ChatInput(
        [
            replace(
                turn,
                parts=[_remembered_image(next(sizes)) if isinstance(p, ImageRef) else p for p in turn.parts],
            )
            for turn in turns
        ],
        params,
    )
    context.record.images = [ImageStat(*sizes) for sizes in hit.images]
    context.record.cache = "hit"
    return chat, _from_cache(context, chat, hit)


def _remembered_image(sizes: tuple[int, int, int, int]) -> DecodedImage:
    width, height, resized_width, resized_height = sizes
    return DecodedImage(None, width, height, (resized_width, resized_height))


def _model_sizes(state: Service, chat: ChatInput) -> list[tuple[int, int]]:
    """The sizes the model would see the images at, without running its processor."""
    fit = state.backend.capabilities().image_fit
    return [fit(*image.resized_to) if fit else image.resized_to for image in chat.images]


def _fallback(context: RequestContext, chat: ChatInput) -> Answer:
    context.fall_back()
    generation = Generation(context.settings.fallback_message, None, 0, 0, "fallback")
    return _fixed(context, chat, generation)


def _cache_key(context: RequestContext, chat: ChatInput) -> CacheKey | None:
    """The request's cache key, made once; None when it must not be cached (or nothing would find it)."""
    state = context.service
    revision = cache_revision(state, chat.params)
    if revision is None:  # not loaded: images were not decoded to the model's size, so skip
        return None
    if any(isinstance(part, DecodedVideo) for turn in chat.turns for part in turn.parts):
        return None  # a video's key would need its frames hashed; videos are not cached
    if context.cache_key is not None:
        return context.cache_key
    from glmvision.serving.cache import make_key

    assert state.cache is not None  # cache_revision() said so
    keyed: dict[str, Any] = {**asdict(chat.params), "scope": cache_scope(state.settings, context.key_id)}
    budgets = [image.budget.key() if image.budget is not None else None for image in chat.images]
    if any(budgets):
        # A perceptual match ignores an image's size: the detail asked for must match too (and an
        # upstream engine is told the detail).
        keyed["image_budgets"] = budgets
    context.cache_key = make_key(
        state.backend.capabilities().model_names[0],
        revision,
        [image.image for image in chat.images],
        conversation(chat.turns),
        keyed,
        state.cache.perceptual,
    )
    return context.cache_key


def _after_answer(
    context: RequestContext,
    chat: ChatInput,
    key: CacheKey | None,
    alias: CacheKey | None = None,
) -> Callable[[Generation], None] | None:
    """What to do with a finished answer: store it in the cache (by pixels and by bytes), audit it."""
    state = context.service
    cache, audit, params = state.cache, state.audit, chat.params
    if (cache is None or key is None) and audit is None:
        return None

    def done(result: Generation) -> None:
        complete = result.finish_reason == "stop" or result.completion_tokens >= params.max_new_tokens
        complete = complete and not result.tool_calls  # an upstream's parsed calls are not in the text
        if cache is not None and key is not None and complete:
            from glmvision.serving.cache import CachedAnswer

            stored = CachedAnswer(
                result.text,
                result.reasoning,
                result.prompt_tokens,
                result.completion_tokens,
                result.finish_reason,
                tuple((i.width, i.height, *i.resized_to) for i in chat.images),
                result.cached_tokens,
                result.image_tokens,
            )
            cache.put(key, stored)
            if alias is not None:
                cache.put(alias, stored)
        if audit is not None:
            audit.write(audit_record(chat, context, result, state.redacting))

    return done


def audit_record(
    chat: ChatInput, context: RequestContext, result: Generation, redactor: Redactor | None
) -> dict[str, Any]:
    """The audit log's entry: who asked what about which images, and the answer they got."""
    text, reasoning = result.text, result.reasoning
    if redactor is not None:
        text = redactor.redact(text)
        reasoning = None if reasoning is None else redactor.redact(reasoning)
    images = [
        {
            "width": image.width,
            "height": image.height,
            # Of the pixels; an exact repeat answered from the cache was never decoded.
            "sha256": None if image.image is None else hashlib.sha256(image.image.tobytes()).hexdigest(),
        }
        for image in chat.images
    ]
    return {
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "request_id": context.request_id,
        "route": context.route,
        "key_id": context.key_id,
        "client": context.client,
        "messages": conversation(chat.turns),
        "images": images,
        "answer": text,
        "reasoning": reasoning,
        "finish_reason": result.finish_reason,
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
    }


def _log_generation(generation: Generation, elapsed: float) -> None:
    log.debug(
        "generated prompt_tokens=%d completion_tokens=%d finish=%s in %.3fs",
        generation.prompt_tokens,
        generation.completion_tokens,
        generation.finish_reason,
        elapsed,
    )


def new_request_id(prefix: str) -> str:
    """Return a fresh response id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(generation: Generation) -> Usage:
    """Return token accounting in the OpenAI shape."""
    return Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
        prompt_tokens_details=(
            None
            if generation.cached_tokens is None and generation.image_tokens is None
            else PromptTokensDetails(
                cached_tokens=generation.cached_tokens or 0, image_tokens=generation.image_tokens
            )
        ),
    )
