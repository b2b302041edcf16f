"""Choosing each row's next token with that row's own settings, whatever else shares the batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..generation import GenerationParams
from .grammar import CompiledConstraint, RowGrammar


@dataclass
class RowSampling:
    """One row's sampling settings, and its own random generator when it asked for a seed."""

    temperature: float
    top_p: float
    min_new_tokens: int
    generator: Any = None  # torch.Generator: a seeded row draws from nobody else's stream
    grammar: RowGrammar | None = None  # what its answer must match (glmvision.local.grammar)

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
        return cls(params.temperature, top_p, params.min_new_tokens, generator, grammar)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def choose_tokens(
    logits: Any, rows: Sequence[RowSampling], generated: Sequence[int], stop_ids: Any
) -> list[int]:
    """Next token per row from last-position logits [rows, vocab]: argmax, or a draw after
    temperature and top-p, with stop tokens barred until a row has its min_new_tokens, and a
    constrained row's tokens limited to what its grammar allows."""
    import torch

    logits = logits.float()
    constrained = [
        (i, row.grammar) for i, row in enumerate(rows) if row.grammar is not None and row.grammar.active
    ]
    pairs = enumerate(zip(rows, generated, strict=True))
    early = [i for i, (row, count) in pairs if count < row.min_new_tokens]
    if early or constrained:
        logits = logits.clone()  # the model's output is not ours to change
    forced: dict[int, int] = {}
    for i, grammar in constrained:
        token = grammar.constrain(logits[i : i + 1], generated[i])
        if token is not None:
            forced[i] = token
    if early:
        index = torch.tensor(early, device=logits.device)
        logits[index[:, None], stop_ids[None, :]] = -float("inf")
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        probs = warped_probabilities(
            logits[index],
            torch.tensor([rows[i].temperature for i in sampled], device=logits.device),
            torch.tensor([rows[i].top_p for i in sampled], device=logits.device),
        )
        draws = torch.empty(len(sampled), dtype=torch.long, device=logits.device)
        shared = [j for j, i in enumerate(sampled) if rows[i].generator is None]
        if shared:  # unseeded rows draw together from torch's global generator
            at = torch.tensor(shared, device=logits.device)
            draws[at] = torch.multinomial(probs[at], 1).squeeze(1)
        for j, i in enumerate(sampled):
            if rows[i].generator is not None:
                draws[j] = torch.multinomial(probs[j : j + 1], 1, generator=rows[i].generator)[0, 0]
        chosen[index] = draws
    tokens = chosen.tolist()
    for i, grammar in constrained:
        tokens[i] = forced[i] if i in forced else grammar.vet(tokens[i], generated[i])
    for row, token in zip(rows, tokens, strict=True):
        if row.grammar is not None:
            row.grammar.accept(token)
    return tokens


def warped_probabilities(logits: Any, temperature: Any, top_p: Any) -> Any:
    """Softmax of logits / temperature, keeping per row the fewest most likely tokens whose
    probabilities reach top_p (the most likely one always); the same rule as transformers' warpers."""
    import torch

    scaled = logits / temperature[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
    drop = before >= top_p[:, None]
    drop[:, 0] = False
    ordered = ordered.masked_fill(drop, -float("inf"))
    kept = torch.empty_like(scaled).scatter_(-1, order, ordered)
    return kept.softmax(dim=-1)
