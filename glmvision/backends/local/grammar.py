"""Constrained decoding: a grammar masks a row's logits at every step, so its answer matches a schema.

The grammar engine is xgrammar (vLLM's and SGLang's default): it compiles a JSON schema against the
tokenizer's vocabulary once, and then gives each step's allowed tokens as a bitmask in microseconds.
Compiling happens in processes that can be killed, within a time budget (`compiler`), never in
the model's thread. A row's matcher follows the tokens it takes. Rows are independent, so
constrained and free rows share a batch under either scheduler.

A mask alone keeps an answer on a valid path, but not within its token budget: a model (the random
demo one above all) may keep a string open until `max_tokens` cuts it. So a row also knows the
shortest way to close its document from where it is (a deterministic walk on a copy of its matcher),
and near the end of its budget takes only tokens that leave that way open: valid by construction
whenever the budget holds the shortest document at all.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glmvision.backends.local.compiler import (
    LARGEST_GRAMMAR,
    START_SECONDS,
    Abandoned,
    Busy,
    CompileFailed,
    CompilerPool,
    GrammarLimits,
    NotStarted,
    TooLarge,
    TooSlow,
    Vocabularies,
)
from glmvision.core.errors import APIError, bad_request, out_of_time, unavailable
from glmvision.core.generation import Constraint
from glmvision.postprocess.tools import CALL_CLOSE, CALL_OPEN, TOOL_TAGS

log = logging.getLogger("glmvision")


class DeadEnd(Exception):
    """A row's grammar allows no token at all: the vocabulary cannot spell what the schema needs next
    (a character whose bytes no allowed token holds, say). The row cannot go on; the schema is at fault."""


# How often a request waiting for another's compile of the same schema looks at its client.
FOLLOW_POLL = 0.05
# The characters that close a document soonest, in the order they are tried: end a string, an
# object, an array; a comma only where the schema needs more (a number ends there too); a 0 is a
# whole number. Structure comes before digits, or a fraction would never end.
CLOSING_CHARACTERS = ('"', "}", "]", ",", "0")
# A row re-measures its shortest closing this often, and every step once its budget is within
# twice that length plus this margin (where one token could make the closing longer than the budget).
MEASURE_EVERY = 16
NEAR_END_MARGIN = 32
# A closing walk longer than this, or taking longer than this many seconds, is treated as "close
# now": the row follows the walk from then on, and ends by its token budget if the walk never closes.
LONGEST_CLOSING = 1024
LONGEST_CLOSING_SECONDS = 0.1


# The start of a UTF-16 surrogate (U+D800..U+DFFF) in UTF-8, or a lead byte that could begin one.
_SURROGATE = re.compile(rb"\xed([\xa0-\xbf]|$)")


def json_safe(token: bytes) -> bool:
    """Whether a token's bytes may appear in compact JSON text, where xgrammar 0.2.9 is too lenient."""
    # Raw control characters are never valid there, yet that xgrammar allows them in strings with
    # a minLength or maxLength; and it takes surrogates, which decode to three U+FFFD each (a
    # real vocabulary spells U+D000..U+D7FF with merged tokens, so the lone lead byte is no loss).
    return not any(byte < 0x20 for byte in token) and not _SURROGATE.search(token)


# One character of a string value that can hold no tag and needs no JSON escape.
TAG_FREE_CHARACTER = r'[^<"\\\x00-\x1f]'


def tag_free(schema: Any) -> Any:
    """A tool's schema with its length-bounded strings as patterns without '<' (so without tags).

    xgrammar drops minLength/maxLength from strings it must keep tags out of; a pattern keeps both.
    """
    if isinstance(schema, list):
        return [tag_free(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: tag_free(value) for key, value in schema.items()}
    kinds = schema.get("type")
    is_string = kinds == "string" or (isinstance(kinds, list) and "string" in kinds)
    bounded = "minLength" in schema or "maxLength" in schema
    if is_string and bounded and not {"pattern", "format", "enum", "const"} & schema.keys():
        least, most = schema.pop("minLength", 0), schema.pop("maxLength", "")
        schema["pattern"] = f"^{TAG_FREE_CHARACTER}{{{least},{most}}}$"
    return schema


class GrammarBook:
    """A tokenizer's grammars: compiled in killable processes within a budget, cached by size."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_ids: list[int],
        think: tuple[int, int] | None = None,
        limits: GrammarLimits | None = None,
    ) -> None:
        import xgrammar

        # Control tokens (<|image|>, <think>...) are never part of an answer's text: xgrammar treats
        # tokens whose text is empty as special, and never allows them. A call grammar's vocabulary
        # has the tool-call tags too, so that it can take them whole; a JSON one does not.
        added = tokenizer.added_tokens_decoder
        tags = {token.content: token_id for token_id, token in added.items() if token.content in TOOL_TAGS}
        special = set(tokenizer.all_special_ids) | {
            token_id for token_id, token in added.items() if token.special
        }
        detected = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids
        )
        vocabulary = [
            b"" if i in special or not json_safe(text) else text
            for i, text in enumerate(detected.decoded_vocab)
        ]
        with_tags = list(vocabulary)
        for tag, token_id in tags.items():
            with_tags[token_id] = tag.encode()
        self.limits = limits or GrammarLimits()
        vocabularies = Vocabularies(vocabulary, with_tags, vocab_size, list(stop_ids))
        # The compiler processes build the same two tokenizers from these; a grammar they send back
        # is read against ours.
        self._infos = {kind: vocabularies.tokenizer_info(kind) for kind in ("json", "call")}
        self._pool = CompilerPool(vocabularies, self.limits.workers)
        weakref.finalize(self, self._pool.close)  # a book let go takes its processes with it
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self.think = think  # the ids of <think> and </think>, when the model has them
        self._compiled: OrderedDict[Constraint, CompiledConstraint] = OrderedDict()
        self._sizes: dict[Constraint, int] = {}
        self._flights: dict[Constraint, _Flight] = {}
        self._lock = threading.RLock()  # cached() is called with it held, too
        self.compiled = self.hits = self.evicted = 0
        self.compile_seconds = 0.0
        self.cached_bytes = 0
        by_text = {text: i for i, text in reversed(list(enumerate(vocabulary))) if len(text) == 1}
        self._character_token = {chr(text[0]): i for text, i in by_text.items() if text[0] < 0x80}
        json_closers = [self._character_token[c] for c in CLOSING_CHARACTERS if c in self._character_token]
        self._json_closers = json_closers
        # In a call, JSON's closers for values that are JSON; then the tags that end a value, the call,
        # and open the next argument.
        ending = [tags[tag] for tag in ("</arg_value>", "</tool_call>", "<arg_key>") if tag in tags]
        self._call_closers = json_closers + ending
        self._tags = tags
        self._probe = xgrammar.allocate_token_bitmask(1, vocab_size)  # the model thread's scratch
        # Every token whose text does not start with "<", as bitmask words: a state whose allowed
        # tokens all miss it must spell a tag next.
        import numpy

        not_angle = numpy.zeros(self._probe.shape[1] * 32, dtype=bool)
        not_angle[: len(with_tags)] = [not word.startswith(b"<") for word in with_tags]
        self._not_angle = numpy.packbits(not_angle, bitorder="little").view(numpy.int32)

    def compile(
        self, constraint: Constraint, deadline: float | None = None, gone: Callable[[], bool] = lambda: False
    ) -> CompiledConstraint:
        """The constraint's grammar (compiled once per schema); a 400 on its field if it cannot be,
        or if it takes over the budget. `deadline` (monotonic) and `gone()` end the wait early."""
        if deadline is None:  # no request's: a new compiler's start, a wait and a compile
            deadline = time.monotonic() + START_SECONDS + 2 * self.limits.timeout
        while True:
            with self._lock:
                compiled = self.cached(constraint)
                if compiled is not None:
                    return compiled
                flight = self._flights.get(constraint)
                leading = flight is None
                if flight is None:
                    flight = self._flights[constraint] = _Flight()
            if leading:
                try:
                    compiled = self._lead(constraint, deadline, gone)
                    flight.compiled = compiled
                    return compiled
                except APIError as exc:
                    if exc.code == 400:  # the schema's own fault; a hang-up or a deadline is the request's
                        flight.error = exc
                    raise
                finally:
                    with self._lock:
                        del self._flights[constraint]
                    flight.done.set()
            # The same schema is compiling for another request: its outcome is this one's too.
            self._follow(flight, deadline, gone)
            if flight.error is not None:
                raise copy.copy(flight.error)
            if flight.compiled is not None:
                with self._lock:
                    self.hits += 1
                return flight.compiled
            # Its request ended first (a hang-up, its deadline, a busy pool): try again for this one.

    def cached(self, constraint: Constraint) -> CompiledConstraint | None:
        """The constraint's grammar if it is compiled already (a hit), else None."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
                self.hits += 1
            return compiled

    def _lead(self, constraint: Constraint, deadline: float, gone: Callable[[], bool]) -> CompiledConstraint:

        started = time.perf_counter()
        kind, text = self._source(constraint)
        timeout = self.limits.timeout
        try:
            serialized = self._pool.compile(kind, text, timeout, deadline, gone)
        except CompileFailed as exc:
            # xgrammar's messages start with a time and its own source line: the client needs neither.
            lines = str(exc).strip().splitlines() or ["unknown error"]
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0])
            message = f"The JSON schema cannot be used: {reason[:300]}"
            raise bad_request("invalid_schema", message, constraint.param) from None
        except TooSlow:
            log.warning("a %s grammar took over %g s to compile: its compiler was killed", kind, timeout)
            message = (
                f"The schema takes over {timeout:g} s (GLMVISION_GRAMMAR_TIMEOUT) to compile into a "
                "grammar: make it simpler (less nesting, smaller repetition counts)."
            )
            raise bad_request("schema_too_complex", message, constraint.param) from None
        except TooLarge:
            log.warning(
                "a %s grammar was too large to use (over %d MiB serialized)", kind, LARGEST_GRAMMAR >> 20
            )
            message = "The schema compiles into too large a grammar: make it simpler (less nesting)."
            raise bad_request("schema_too_complex", message, constraint.param) from None
        except Busy:
            message = "Every grammar compiler is busy with other schemas; retry shortly."
            raise unavailable("grammar_busy", message, max(1, math.ceil(timeout))) from None
        except NotStarted as exc:
            log.error("%s", exc)
            raise unavailable("grammar_busy", "No grammar compiler is available; retry shortly.", 1) from None
        except Abandoned as exc:
            if not exc.gone:
                raise out_of_time() from None
            raise APIError(499, "client_closed", "The client closed the connection.") from None
        compiled = self._read(kind, serialized)
        elapsed = time.perf_counter() - started
        self._keep(constraint, compiled)
        with self._lock:
            self.compiled += 1
            self.compile_seconds += elapsed
        log.info("compiled a %s grammar in %.1f ms", constraint.kind, elapsed * 1000)
        return compiled

    def _read(self, kind: str, serialized: str) -> CompiledConstraint:
        import xgrammar

        grammar = xgrammar.CompiledGrammar.deserialize_json(serialized, self._infos[kind])
        closers = self._json_closers if kind == "json" else self._call_closers
        return CompiledConstraint(self, grammar, closers, kind == "call", serialized)

    def adopt(self, constraint: Constraint, serialized: str) -> CompiledConstraint:
        """A grammar another process compiled for `constraint` (an engine process's Submit), cached."""
        compiled = self.cached(constraint)
        if compiled is None:
            compiled = self._read("json" if constraint.tools is None else "call", serialized)
            self._keep(constraint, compiled)
        return compiled

    def _follow(self, flight: _Flight, deadline: float, gone: Callable[[], bool]) -> None:
        while not flight.done.wait(max(0.0, min(deadline - time.monotonic(), FOLLOW_POLL))):
            if time.monotonic() >= deadline:
                raise out_of_time()
            if gone():
                raise APIError(499, "client_closed", "The client closed the connection.")

    def _keep(self, constraint: Constraint, compiled: CompiledConstraint) -> None:
        """Cache it, the least recently used grammars out beyond the byte budget."""
        size = int(compiled.grammar.memory_size_bytes)
        with self._lock:
            if size > self.limits.cache_bytes or constraint in self._compiled:
                return
            self._compiled[constraint] = compiled
            self._sizes[constraint] = size
            self.cached_bytes += size
            while self.cached_bytes > self.limits.cache_bytes:
                old, _ = self._compiled.popitem(last=False)
                self.cached_bytes -= self._sizes.pop(old)
                self.evicted += 1

    def _source(self, constraint: Constraint) -> tuple[str, str]:
        """What a compiler process compiles: ("json", a schema) or ("call", a structural tag)."""
        if constraint.tools is None:
            return "json", constraint.schema if constraint.schema is not None else '{"type": "object"}'
        from xgrammar.structural_tag import JSONSchemaFormat, OrFormat, StructuralTag, TagFormat

        calls = [
            TagFormat(
                begin=CALL_OPEN + tool["function"]["name"],
                content=JSONSchemaFormat(
                    json_schema=tag_free(tool["function"].get("parameters") or {"type": "object"}),
                    style="glm_xml",  # GLM-4.5/4.6's <arg_key>k</arg_key><arg_value>v</arg_value>
                    max_whitespace_cnt=1,
                    excludes=list(TOOL_TAGS),  # or a value could end its call early, for the parser
                ),
                end=CALL_CLOSE,
            )
            for tool in json.loads(constraint.tools)
        ]
        return "call", StructuralTag(format=OrFormat(elements=calls)).model_dump_json()

    def closing_token(self, matcher: Any, bitmask: Any, closers: list[int], probe: bool = False) -> int:
        """The next token of the shortest way (as this walk finds it) to end the document."""
        import torch

        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask[0]
        bits = words.numpy()  # a view: reading it costs far less than indexing the tensor

        def allowed(token_id: int) -> bool:
            return bool((int(bits[token_id >> 5]) >> (token_id & 31)) & 1)

        # A tag the grammar requires next is taken whole. (Not found with xgrammar's
        # find_jump_forward_string: on a grammar that recurses with no way out, it never returns.)
        if probe and not (bits & self._not_angle).any():  # every allowed token starts with "<"
            tags = [token_id for token_id in self._tags.values() if allowed(token_id)]
            if len(tags) == 1:
                return tags[0]
        candidates = (token_id for token_id in closers + self.stop_ids if allowed(token_id))
        if not probe:
            # JSON has no free text: its first allowed closer always changes what may follow.
            first = next(candidates, None)
            if first is not None:
                return first
        # In free text (a call's string value) a quote is one more character, and only the value's
        # end tag closes it: a closer helps only where it changes what may follow.
        fallback = None
        for token_id in candidates:
            fallback = token_id if fallback is None else fallback
            after = matcher.fork()
            after.accept_token(token_id)
            if after.is_terminated():
                return token_id
            after.fill_next_token_bitmask(self._probe)
            if not torch.equal(self._probe, bitmask):
                return token_id
        if fallback is not None:
            return fallback

        allowed_words = torch.nonzero(words)
        if allowed_words.numel() == 0:
            raise DeadEnd
        word = int(allowed_words[0, 0])
        bits = int(words[word]) & 0xFFFFFFFF
        return word * 32 + (bits & -bits).bit_length() - 1

    def closing_length(self, matcher: Any, bitmask: Any, closers: list[int], probe: bool = False) -> int:
        """Tokens (its stop token included) the closing walk takes from the matcher's state."""
        walker = matcher.fork()
        steps = 0
        until = time.perf_counter() + LONGEST_CLOSING_SECONDS
        while not walker.is_terminated():
            if steps >= LONGEST_CLOSING or time.perf_counter() > until:
                return LONGEST_CLOSING
            try:
                token_id = self.closing_token(walker, bitmask, closers, probe)
            except DeadEnd:  # this walk led where the vocabulary cannot go on: no way to close by it
                return LONGEST_CLOSING
            if not walker.accept_token(token_id):
                return LONGEST_CLOSING
            steps += 1
        return steps


@dataclass
class _Flight:
    """One compile under way, and its outcome for the requests that wait on it."""

    done: threading.Event = field(default_factory=threading.Event)
    compiled: CompiledConstraint | None = None
    error: APIError | None = None


@dataclass(frozen=True)
class CompiledConstraint:
    """A compiled grammar ready to start rows on."""

    book: GrammarBook
    grammar: Any
    closers: list[int]  # the tokens its closing walk tries, in order
    probe: bool  # whether a closer is checked to change what may follow (a grammar with free text)
    serialized: str = ""  # xgrammar's serialize_json(): how an engine process receives it

    def start(self, budget: int, after_thinking: bool) -> RowGrammar:
        """A fresh matcher for one row of `budget` tokens."""
        return RowGrammar(self, budget, after_thinking)


class RowGrammar:
    """One row's grammar state: masks its logits, follows its tokens, and closes in time."""

    def __init__(self, compiled: CompiledConstraint, budget: int, after_thinking: bool) -> None:
        import xgrammar

        book = compiled.book
        self._book = book
        self._closers = compiled.closers
        self._probe = compiled.probe
        self._matcher = xgrammar.GrammarMatcher(compiled.grammar)
        self._bitmask = xgrammar.allocate_token_bitmask(1, book.vocab_size)
        self._scratch = xgrammar.allocate_token_bitmask(1, book.vocab_size)
        self._budget = budget
        # With thinking on, the reasoning is free text and the grammar starts after </think>.
        self.waiting = after_thinking and book.think is not None
        self._closing: int | None = None  # the closing walk's length from the matcher's state
        self._measured_at = 0
        self._fresh = False  # whether _closing was measured from the matcher's current state
        self._next: tuple[int, int] | None = None  # a vetted token and the closing after it

    @property
    def active(self) -> bool:
        """Whether the grammar still has a say in this row's tokens (it has none once the document ends)."""
        return not self._matcher.is_terminated()

    def constrain(self, logits: Any, generated: int) -> int | None:
        """Mask one row's logits [1, vocab] in place, or give the token it must take to close in time."""
        remaining = self._budget - generated
        if self.waiting:  # free reasoning, opened and ended in time for the shortest document to follow
            assert self._book.think is not None
            think_open, think_end = self._book.think
            if self._closing is None:
                self._closing = self._length_to_close(self._matcher)
            if generated == 0:
                return think_open
            if remaining <= 2 * self._closing + NEAR_END_MARGIN + 1:
                return think_end
            logits[0, self._book.stop_ids] = -float("inf")  # a document must still follow
            return None
        stale = self._closing is None or generated - self._measured_at >= MEASURE_EVERY
        if stale or (self.near_end(generated) and not self._fresh):
            self._closing = self._length_to_close(self._matcher)
            self._measured_at, self._fresh = generated, True
        assert self._closing is not None
        if self.near_end(generated) and self._closing >= remaining:
            return self._follow_the_walk()
        self._matcher.fill_next_token_bitmask(self._bitmask)
        if not bool(self._bitmask.any()):
            raise DeadEnd
        self._apply(logits)
        return None

    def near_end(self, generated: int) -> bool:
        """Whether one token could now leave too little budget to close: each choice is vetted."""
        if self.waiting or self._closing is None:
            return False
        return self._budget - generated <= 2 * self._closing + NEAR_END_MARGIN

    def vet(self, token_id: int, generated: int) -> int:
        """The token chosen from the masked logits, or near the end, the closing walk's token instead
        when the document could no longer close within the budget after it."""
        if self.waiting or not self.near_end(generated):
            return token_id
        after = self._matcher.fork()
        if after.accept_token(token_id):
            if after.is_terminated():
                return token_id
            room = self._length_to_close(after)
            if room <= self._budget - generated - 1:
                self._next = (token_id, room)  # the next step need not walk again
                return token_id
        return self._follow_the_walk()

    def accept(self, token_id: int) -> None:
        """Follow the token the row took."""
        known, self._next = self._next, None
        self._fresh = known is not None and known[0] == token_id
        if self._fresh:
            assert known is not None
            self._closing = known[1]
        if self.waiting:
            self.waiting = self._book.think is None or token_id != self._book.think[1]
        elif not self._matcher.is_terminated() and not self._matcher.accept_token(token_id):
            log.warning("a constrained row took token %d outside its grammar", token_id)

    def _length_to_close(self, matcher: Any) -> int:
        return self._book.closing_length(matcher, self._scratch, self._closers, self._probe)

    def _follow_the_walk(self) -> int:
        """The closing walk's next token; the walk after it is one token shorter."""
        assert self._closing is not None
        token_id = self._book.closing_token(self._matcher, self._scratch, self._closers, self._probe)
        self._next = (token_id, max(self._closing - 1, 0))
        return token_id

    def _apply(self, logits: Any) -> None:
        import xgrammar

        xgrammar.apply_token_bitmask_inplace(
            logits, self._bitmask.to(logits.device), vocab_size=self._book.vocab_size
        )
