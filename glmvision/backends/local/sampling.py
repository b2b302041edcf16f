"""Choosing each row's next token with that row's own settings, whatever else shares the batch."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from glmvision.backends.local.grammar import CompiledConstraint, DeadEnd, RowGrammar
from glmvision.core.generation import GREEDY_BELOW, IMPOSSIBLE_LOGPROB, GenerationParams, RawLogprob

log = logging.getLogger("glmvision")


@dataclass
class RowSampling:
    """One row's sampling settings, and its own random generator when it asked for a seed."""

    temperature: float
    top_p: float
    min_new_tokens: int
    generator: Any = None  # torch.Generator: a seeded row draws from nobody else's stream
    grammar: RowGrammar | None = None  # what its answer must match (glmvision.backends.local.grammar)
    logprobs: int | None = None  # report the chosen token's log-probability and this many alternatives
    last_logprobs: RawLogprob | None = None  # those of the token choose_tokens chose last

    @classmethod
    def for_params(
        cls, params: GenerationParams, device: Any, constraint: CompiledConstraint | None = None
    ) -> RowSampling:
        generator = None
        if params.temperature > 0 and params.seed is not None:
            import torch

            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        top_p = params.top_p if params.top_p is not None else 1.0
        grammar = None
        if constraint is not None:
            grammar = constraint.start(params.max_new_tokens, params.enable_thinking)
        return cls(params.temperature, top_p, params.min_new_tokens, generator, grammar, params.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def choose_tokens(
    logits: Any, rows: Sequence[RowSampling], generated: Sequence[int], stop_ids: Any
) -> list[int | Exception]:
    """Next token per row from last-position logits [rows, vocab]: argmax, or a draw after
    temperature and top-p, with stop tokens barred until a row has its min_new_tokens, and a
    constrained row's tokens limited to what its grammar allows. A row whose own part fails (its
    grammar, its draw) gets the exception in place of a token; the other rows are not touched.
    A row that asked for log-probabilities gets them in `last_logprobs` (see `row_logprobs`)."""
    import torch

    logits = ordered_logits(logits.float())  # a copy: the model's output is not ours to change
    failed: dict[int, Exception] = {}
    constrained: list[int] = []
    forced: dict[int, int] = {}
    for i, row in enumerate(rows):
        if row.grammar is None:
            continue
        try:
            if not row.grammar.active:
                continue
            token = row.grammar.constrain(logits[i : i + 1], generated[i])
        except Exception as exc:  # noqa: BLE001 - logged, and that row alone is answered
            note_row_failure("a row's grammar failed to constrain its logits", exc)
            failed[i] = exc
            continue
        constrained.append(i)
        if token is not None:
            forced[i] = token
    early = [
        i for i, (row, count) in enumerate(zip(rows, generated, strict=True)) if count < row.min_new_tokens
    ]
    if early:
        index = torch.tensor(early, device=logits.device)
        logits[index[:, None], stop_ids[None, :]] = -float("inf")
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.greedy and i not in failed]
    probs = None
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        probs = warped_probabilities(
            logits[index],
            torch.tensor([rows[i].temperature for i in sampled], device=logits.device),
            torch.tensor([rows[i].top_p for i in sampled], device=logits.device),
        )
        draws = chosen[index]
        shared = [j for j, i in enumerate(sampled) if rows[i].generator is None]
        if shared:  # unseeded rows draw together from torch's global generator
            at = torch.tensor(shared, device=logits.device)
            draws[at] = torch.multinomial(probs[at], 1).squeeze(1)
        for j, i in enumerate(sampled):
            if rows[i].generator is not None:
                try:
                    draws[j] = torch.multinomial(probs[j : j + 1], 1, generator=rows[i].generator)[0, 0]
                except Exception as exc:
                    log.exception("a seeded row's draw failed: that row alone fails")
                    failed[i] = exc
        chosen[index] = draws
    tokens: list[int | Exception] = list(chosen.tolist())
    for i in constrained:
        grammar = rows[i].grammar
        assert grammar is not None
        try:
            tokens[i] = forced[i] if i in forced else grammar.vet(chosen_id(tokens[i]), generated[i])
        except Exception as exc:  # noqa: BLE001 - logged, and that row alone is answered
            note_row_failure("a row's grammar failed to vet its token", exc)
            failed[i] = exc
    for i, row in enumerate(rows):
        if row.grammar is not None and i not in failed:
            try:
                row.grammar.accept(chosen_id(tokens[i]))
            except Exception as exc:  # noqa: BLE001 - logged, and that row alone is answered
                note_row_failure("a row's grammar failed to follow its token", exc)
                failed[i] = exc
    for i, row in enumerate(rows):
        if row.logprobs is None or i in failed:
            row.last_logprobs = None
            continue
        # A greedy row reports the model's distribution (masked as above), a sampled one that it drew from.
        if row.greedy or probs is None:
            log_probs = logits[i].log_softmax(-1)
        else:
            log_probs = probs[sampled.index(i)].log()
        row.last_logprobs = row_logprobs(log_probs, chosen_id(tokens[i]), row.logprobs)
    return [failed.get(i, token) for i, token in enumerate(tokens)]


def row_logprobs(log_probs: Any, token: int, top: int) -> RawLogprob:
    """`token`'s log-probability in one row's distribution [vocab] and the `top` most likely tokens',
    read back in one transfer; a token it cannot draw reports IMPOSSIBLE_LOGPROB, as OpenAI's do."""
    import torch

    best = log_probs.topk(top) if top else None
    values = (
        log_probs[token : token + 1]
        if best is None
        else torch.cat([log_probs[token : token + 1], best.values])
    )
    # min(): a rounding error must not make a certainty more than certain.
    numbers = [min(value, 0.0) if math.isfinite(value) else IMPOSSIBLE_LOGPROB for value in values.tolist()]
    ids = [] if best is None else best.indices.tolist()
    return numbers[0], tuple(zip(ids, numbers[1:], strict=True))


def note_row_failure(what: str, exc: BaseException) -> None:
    """Log one row's failure: a grammar's dead end is the schema's doing (no trace), the rest is ours."""
    if isinstance(exc, DeadEnd):
        log.info("%s: its grammar allows no token here (a dead end); that row alone ends", what)
    else:
        log.error("%s: that row alone fails", what, exc_info=exc)


def chosen_id(token: int | Exception) -> int:
    """A token id that choose_tokens gave (not a row's failure)."""
    assert isinstance(token, int)
    return token


def ordered_logits(logits: Any) -> Any:
    """A copy of logits with NaN, which no comparison orders, as the least likely (-inf); +inf stays
    the most likely, so argmax and the draw agree on any row the model may put out."""
    return logits.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def warped_probabilities(logits: Any, temperature: Any, top_p: Any) -> Any:
    """Softmax of logits / temperature, keeping per row the fewest most likely tokens whose
    probabilities reach top_p (the most likely one always); the same rule as transformers' warpers.
    A row with no finite distribution (huge logits over a small temperature, no finite logit) is
    all on its argmax, as a colder sample would be: every row can be drawn from."""
    import torch

    logits = ordered_logits(logits)
    scaled = logits / temperature.clamp(min=GREEDY_BELOW)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
    drop = before >= top_p[:, None]
    drop[:, 0] = False
    ordered = ordered.masked_fill(drop, -float("inf"))
    kept = torch.empty_like(scaled).scatter_(-1, order, ordered).softmax(dim=-1)
    usable = kept.isfinite().all(dim=-1) & (kept.sum(dim=-1) > 0)
    argmax = torch.zeros_like(kept).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(usable[:, None], kept, argmax)
