"""The static scheduler: a batch forms between generate() calls and runs to its longest row's end.

Kept beside the continuous scheduler for comparison and as a fallback (GLMVISION_SCHEDULER=static).
Rows in one generate() share its sampling settings, so only requests with equal settings share a batch.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from glmvision.backends.local.engine import (
    Job,
    QueueEngine,
    collate,
    fail_row,
    fail_unfinished,
    finish,
    gpu_out_of_memory,
    mark_started,
    on_device,
    stop_if_gone_or_late,
)
from glmvision.backends.local.grammar import RowGrammar
from glmvision.backends.local.sampling import note_row_failure, ordered_logits, warped_probabilities
from glmvision.backends.local.vram import release_cuda_cache

log = logging.getLogger("glmvision")


def sampling_group(job: Job) -> tuple[Any, ...]:
    """Rows with equal groups can share one generate() call."""
    p = job.params
    if p.seed is not None and p.temperature > 0:
        return ("seeded", id(job))  # a reproducible sample needs the RNG to itself
    sampling = (p.temperature, p.top_p) if p.temperature > 0 else ()
    return (p.temperature > 0, *sampling, p.min_new_tokens)


class RowStreamer:
    """Receives each step's tokens for the whole batch and routes them to the rows still running."""

    def __init__(self, jobs: list[Job], stop_ids: set[int]) -> None:
        self._jobs = jobs
        self._stop_ids = stop_ids
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompts themselves
            self._prompt_seen = True
            return
        for job, token_id in zip(self._jobs, value.reshape(-1).tolist(), strict=True):
            if not job.finished:  # past this row's end the tokens are padding, not its own
                job.take(token_id, self._stop_ids)

    def end(self) -> None:
        pass


class GrammarMasks:
    """A logits processor for generate(): each constrained row's logits masked by its own grammar.
    A row whose grammar fails is answered with row_failed and left alone; the batch goes on."""

    def __init__(self, jobs: list[Job]) -> None:
        self._rows: list[tuple[int, Job, RowGrammar]] = []
        for i, job in enumerate(jobs):
            if job.constraint is None:
                continue
            try:
                grammar = job.constraint.start(job.params.max_new_tokens, job.params.enable_thinking)
            except Exception as exc:
                log.exception("starting a row's grammar failed: that row alone fails")
                fail_row(job, exc)
                continue
            self._rows.append((i, job, grammar))
        self._first = True

    def __bool__(self) -> bool:
        return bool(self._rows)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        first, self._first = self._first, False
        for i, job, grammar in self._rows:
            if job.finished:  # its tokens from here on are padding, and a failed row's are ignored
                continue
            try:
                if not first:  # the previous step's token is the last column now
                    grammar.accept(int(input_ids[i, -1]))
                self._constrain(scores, i, job, grammar)
            except Exception as exc:  # noqa: BLE001 - logged, and that row alone is answered
                note_row_failure("a row's grammar failed", exc)
                fail_row(job, exc)
        return scores

    def _constrain(self, scores: Any, i: int, job: Job, grammar: RowGrammar) -> None:
        if not grammar.active:
            return
        token = grammar.constrain(scores[i : i + 1], job.generated)
        if token is None and grammar.near_end(job.generated):
            # Near its budget's end a row's choice must be vetted before it is taken, and
            # generate() takes it after us: so choose here, as generate() would, and vet it.
            token = grammar.vet(self._draw(scores[i : i + 1], job), job.generated)
        if token is not None:
            scores[i] = -float("inf")
            scores[i, token] = 0.0

    @staticmethod
    def _draw(scores: Any, job: Job) -> int:
        import torch

        params = job.params
        if params.temperature <= 0:
            return int(ordered_logits(scores).argmax())
        temperature = torch.tensor([params.temperature], device=scores.device)
        top_p = torch.tensor([params.top_p if params.top_p is not None else 1.0], device=scores.device)
        return int(torch.multinomial(warped_probabilities(scores, temperature, top_p), 1))


class StaticEngine(QueueEngine):
    """Batches compatible waiting requests into one padded generate() call at a time."""

    scheduler = "static"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch: list[Job] = []

    def _held(self) -> list[Job]:
        return self._batch

    def _serve_alone(self, job: Job) -> None:
        self._run([job])

    def _cycle(self) -> None:
        self._batch = self._next_batch()
        if self._batch:
            self._run(self._batch)
            self._tidy_memory()
        self._batch = []

    def _next_batch(self) -> list[Job]:
        with self._cond:
            self._wait_for_work()
            return self._take()

    def _take(self) -> list[Job]:
        now = time.monotonic()
        batch: list[Job] = []
        group: tuple[Any, ...] | None = None
        longest_prompt = longest_new = 0
        kept: deque[Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if self._expire(job, now):
                continue
            # Padded rows all grow to the longest prompt plus the longest answer.
            prompt = max(longest_prompt, job.prompt_tokens)
            new = max(longest_new, job.params.max_new_tokens)
            fits = (len(batch) + 1) * (prompt + new) <= self.max_tokens
            if batch and (len(batch) >= self.max_batch or sampling_group(job) != group or not fits):
                kept.append(job)
                continue
            batch.append(job)
            group, longest_prompt, longest_new = sampling_group(job), prompt, new
        self._queue.extendleft(reversed(kept))
        return batch

    def _run(self, batch: list[Job]) -> None:
        import torch

        try:
            self._generate(batch)
        except torch.OutOfMemoryError:
            release_cuda_cache()
            fresh = [job for job in batch if job.generated == 0 and not job.finished]
            if len(batch) > 1 and len(fresh) == len(batch):
                self.stats.oom_splits += 1
                log.warning("out of GPU memory on a batch of %d: retrying in halves", len(batch))
                half = len(batch) // 2
                self._run(batch[:half])
                self._run(batch[half:])
                return
            log.warning("out of GPU memory on a batch of %d; cache emptied", len(batch))
            fail_unfinished(batch, gpu_out_of_memory())
            return
        self._record(len(batch))

    def _generate(self, batch: list[Job]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        model = self._model
        inputs = on_device(model, collate([job.inputs for job in batch], model.pad_id))
        params = batch[0].params
        sampling: dict[str, Any] = {"do_sample": params.temperature > 0}
        if params.temperature > 0:
            sampling["temperature"] = params.temperature
            if params.top_p is not None:
                sampling["top_p"] = params.top_p
        else:
            sampling.update(temperature=None, top_p=None, top_k=None)
        longest = max(job.params.max_new_tokens for job in batch)
        if params.min_new_tokens:
            sampling["min_new_tokens"] = min(params.min_new_tokens, longest)
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        mark_started(batch)
        stats, expire_waiting, beat = self.stats, self.expire_waiting, self.beat

        class RowsDone(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                beat(sum(not job.finished for job in batch))  # one model call per step
                expire_waiting()
                now = time.monotonic()
                for job in batch:
                    stop_if_gone_or_late(job, stats, now)
                done = [job.finished for job in batch]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        masks = GrammarMasks(batch)
        with torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            model.generate(
                [job.params.adapter for job in batch],
                **inputs,
                max_new_tokens=longest,
                eos_token_id=model.stop_ids,
                pad_token_id=model.pad_id,
                streamer=RowStreamer(batch, set(model.stop_ids)),
                stopping_criteria=StoppingCriteriaList([RowsDone()]),
                logits_processor=LogitsProcessorList([masks] if masks else []),
                **sampling,
            )
        for job in batch:
            finish(job)
