"""Content moderation: the prompt is checked before generation and the answer after it (streamed in
sentence-sized pieces, each checked before it is sent), by an OpenAI-style moderation endpoint or an
in-process callable (GLMVISION_MODERATION_URL / GLMVISION_MODERATION)."""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from glmvision.core.config import Settings
from glmvision.core.errors import api_error
from glmvision.core.generation import AnswerStream, Delta, Generation
from glmvision.core.images import DecodedImage
from glmvision.core.urlfetch import is_url
from glmvision.serving.pipeline import ImageRef, Turn

if TYPE_CHECKING:
    from glmvision.ops.audit import AuditLog
    from glmvision.serving.context import RequestContext

log = logging.getLogger("glmvision")

# What moderation is sent: a string, or OpenAI's multi-modal parts ({"type": "text", "text": ...} and
# {"type": "image_url", "image_url": {"url": "data:..."}}).
ModerationInput = str | list[dict[str, Any]]
# The in-process hook: takes the input, returns {"flagged": bool, "categories": {name: bool}}.
Check = Callable[[ModerationInput], Mapping[str, Any]]

FLUSH_CHARS = 200  # a streamed piece is checked (and sent) at a sentence end or at this length
_SENTENCE_ENDS = (".", "!", "?", "\n", "\u3002", "\uff01", "\uff1f")  # and the CJK full stops
_MAX_REPLY = 1 << 20  # bytes of a moderation reply read at most
_RETRY_AFTER = 5
# Image bytes' first bytes -> MIME type, for base64 images sent without a data URL's type.
_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
)


class ModerationFailed(Exception):
    """The moderation hook gave no usable verdict (timeout, refused, bad reply)."""


@dataclass(frozen=True)
class Verdict:
    """One check's outcome: flagged or not, and the categories that were."""

    flagged: bool
    categories: tuple[str, ...] = ()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is a bad reply, not somewhere else to send the text


def http_check(url: str, timeout: float, key: str = "") -> Check:
    """A check that POSTs {"input": ...} to an OpenAI-style moderation endpoint (no redirects)."""
    opener = urllib.request.build_opener(_NoRedirect)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"

    def check(payload: ModerationInput) -> Mapping[str, Any]:
        body = json.dumps({"input": payload}).encode()
        request = urllib.request.Request(url, body, headers, method="POST")
        try:
            with opener.open(request, timeout=timeout) as reply:
                data = json.loads(reply.read(_MAX_REPLY + 1)[:_MAX_REPLY])
            result = data["results"][0]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:  # URLError is an OSError
            raise ModerationFailed(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(result, Mapping):
            raise ModerationFailed("results[0] is not an object")
        return result

    return check


def import_check(spec: str) -> Check:
    """The callable named by module:function."""
    module, _, name = spec.partition(":")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"GLMVISION_MODERATION={spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def verdict(result: Mapping[str, Any]) -> Verdict:
    """A moderation result ({"flagged", "categories"}) as a Verdict; ModerationFailed when malformed."""
    flagged = result.get("flagged") if isinstance(result, Mapping) else None
    if not isinstance(flagged, bool):
        raise ModerationFailed("the result has no boolean 'flagged'")
    categories = result.get("categories") or {}
    if isinstance(categories, Mapping):
        names = tuple(sorted(str(name) for name, on in categories.items() if on))
    else:
        names = tuple(sorted(str(name) for name in categories))
    return Verdict(flagged, names)


class Moderator:
    """The configured hook, how to treat its failures, and the checks the pipeline makes with it."""

    def __init__(
        self, check: Check, *, images: bool = False, fail_open: bool = False, audit: AuditLog | None = None
    ) -> None:
        self._check = check
        self.images = images
        self.fail_open = fail_open
        self.audit = audit

    @classmethod
    def from_settings(cls, settings: Settings, audit: AuditLog | None = None) -> Moderator | None:
        """The moderator the settings ask for, or None (no moderation: nothing is checked)."""
        if settings.moderation_url:
            key = settings.moderation_key.get_secret_value()
            check = http_check(settings.moderation_url, settings.moderation_timeout, key)
        elif settings.moderation:
            check = _bounded(import_check(settings.moderation), settings.moderation_timeout)
        else:
            return None
        fail_open = settings.moderation_fail == "open"
        return cls(check, images=settings.moderation_images, fail_open=fail_open, audit=audit)

    def check(self, context: RequestContext, stage: str, payload: ModerationInput) -> Verdict:
        """One check, counted in the request's record; a failure serves unchecked (open) or is a 503."""
        try:
            found = verdict(self._check(payload))
        except Exception as exc:  # noqa: BLE001 - an in-house hook's own bug is a failed check too
            context.record.moderation.append((stage, "failed"))
            log.warning(
                "moderation failed stage=%s request_id=%s fail=%s: %s",
                stage,
                context.request_id,
                "open" if self.fail_open else "closed",
                exc,
            )
            if self.fail_open:
                return Verdict(False)
            raise api_error("moderation_unavailable", retry_after=_RETRY_AFTER) from None
        context.record.moderation.append((stage, "flagged" if found.flagged else "passed"))
        if found.flagged:
            self._note(context, stage, found, payload)
        return found

    def check_prompt(self, context: RequestContext, turns: list[Turn], image_param: str) -> None:
        """Check the prompt's text (every turn but the assistant's) and, when asked, its inline images."""
        texts: list[str] = []
        images: list[str] = []
        for turn in turns:
            for part in turn.parts:
                if isinstance(part, str) and turn.role != "assistant" and part:
                    texts.append(part)
                elif isinstance(part, ImageRef) and self.images and not is_url(part.source):
                    images.append(_data_url(part.source))
        self._block_if_flagged(context, "\n".join(texts), images, image_param)

    def check_images(self, context: RequestContext, images: list[DecodedImage], image_param: str) -> None:
        """Check images fetched from URLs, as decoded (fetched once: what is checked is what is seen)."""
        if self.images and images:
            self._block_if_flagged(context, "", [_encoded(image) for image in images], image_param)

    def _block_if_flagged(self, context: RequestContext, text: str, images: list[str], param: str) -> None:
        if not text and not images:
            return
        payload: ModerationInput = text
        if images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
            payload = parts
        found = self.check(context, "input", payload)
        if found.flagged:
            named = ", ".join(found.categories) or "unspecified"
            message = f"The request was blocked by content moderation (categories: {named})."
            raise api_error("content_blocked", message, param if images and not text else None)

    def watch(self, stream: AnswerStream, context: RequestContext) -> ModeratedStream:
        """The stream with its text checked before anyone reads it."""
        return ModeratedStream(stream, self, context)

    def _note(self, context: RequestContext, stage: str, found: Verdict, payload: ModerationInput) -> None:
        """Log a flag with the request id; its content goes only to the (encrypted) audit log."""
        log.warning(
            "moderation flagged stage=%s request_id=%s categories=%s",
            stage,
            context.request_id,
            ",".join(found.categories) or "-",
        )
        if self.audit is None:
            return
        text = payload if isinstance(payload, str) else " ".join(p.get("text", "") for p in payload)
        self.audit.write(
            {
                "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "event": "moderation_flagged",
                "request_id": context.request_id,
                "route": context.route,
                "key_id": context.key_id,
                "stage": stage,
                "categories": list(found.categories),
                "text": text,
            }
        )


class ModeratedStream:
    """An answer stream whose text is held back until moderation has passed it: deltas are released in
    sentence-sized pieces; a flagged piece ends the answer (finish_reason content_filter, no text)."""

    def __init__(self, inner: AnswerStream, moderator: Moderator, context: RequestContext) -> None:
        self._inner = inner
        self._moderator = moderator
        self._context = context
        self._checked: Generation | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # timings, tokens: the inner stream's

    @property
    def result(self) -> Generation | None:
        """The whole answer once it has ended and passed moderation (emptied if it did not)."""
        return self._checked

    def __iter__(self) -> Iterator[Delta]:
        held: list[Delta] = []
        size = 0
        for delta in self._inner:
            held.append(delta)
            size += len(delta.reasoning) + len(delta.content)
            text = delta.content or delta.reasoning
            if size >= FLUSH_CHARS or (text and text.rstrip(" ").endswith(_SENTENCE_ENDS)):
                if not self._passes(held):
                    return
                yield _merged(held)
                held, size = [], 0
        if held and not self._passes(held):
            return
        if held:
            yield _merged(held)
        raw = self._inner.result
        assert raw is not None, "the stream ended without a result"
        self._checked = raw

    def whole(self, client_gone: Callable[[], bool] = lambda: False) -> Generation:
        """The whole answer, checked at once."""
        if self._checked is not None:
            return self._checked
        raw = self._inner.whole(client_gone)
        text = "\n".join(piece for piece in (raw.reasoning, raw.text) if piece)
        if text and self._moderator.check(self._context, "output", text).flagged:
            self._checked = _withheld(raw)
        else:
            self._checked = raw
        return self._checked

    def close(self) -> None:
        self._inner.close()

    def _passes(self, held: list[Delta]) -> bool:
        """Whether the held text passes; if not, generation stops and the answer is withheld."""
        text = "".join(delta.reasoning + delta.content for delta in held)
        if not text or not self._moderator.check(self._context, "output", text).flagged:
            return True
        inner = self._inner
        inner.close()
        raw = inner.result or Generation("", None, inner.prompt_tokens, len(inner.token_ids), "stop")
        self._checked = _withheld(raw)
        return False


def _withheld(raw: Generation) -> Generation:
    return replace(raw, text="", reasoning=None, finish_reason="content_filter", tool_calls=(), logprobs=None)


def _merged(held: list[Delta]) -> Delta:
    return Delta(
        "".join(delta.reasoning for delta in held),
        "".join(delta.content for delta in held),
        tuple(token for delta in held for token in delta.logprobs),
    )


def _bounded(check: Check, timeout: float) -> Check:
    """An in-process check held to the timeout (it runs in a daemon thread; a late answer is dropped)."""
    import threading

    def bounded(payload: ModerationInput) -> Mapping[str, Any]:
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(check(payload))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request thread
                box.append(exc)

        worker = threading.Thread(target=run, daemon=True, name="glmvision-moderation")
        worker.start()
        worker.join(timeout)
        if not box:
            raise ModerationFailed(f"no verdict within {timeout} s")
        if isinstance(box[0], BaseException):
            raise ModerationFailed(f"{type(box[0]).__name__}: {box[0]}")
        return box[0]  # type: ignore[no-any-return]

    return bounded


def _data_url(source: str) -> str:
    """An inline image as a data URL (base64 sent without one gets its type from its first bytes)."""
    if source.startswith("data:"):
        return source
    try:
        head = base64.b64decode(source[:24] + "=" * (-len(source[:24]) % 4), validate=False)
    except (binascii.Error, ValueError):
        head = b""
    mime = next((kind for magic, kind in _MAGIC if head.startswith(magic)), "application/octet-stream")
    return f"data:{mime};base64,{source.strip()}"


def _encoded(image: DecodedImage) -> str:
    """A decoded image as a data URL: its own bytes when kept, else a PNG of what the model sees."""
    if image.original is not None and image.mime:
        return f"data:{image.mime};base64,{base64.b64encode(image.original).decode()}"
    assert image.image is not None
    out = io.BytesIO()
    image.image.save(out, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(out.getvalue()).decode()}"
