"""The continuous scheduler: waiting requests join the running batch between decode steps.

Each cycle of the model thread does a bounded amount of work: the newcomers' prefill (one padded
forward pass over their prompts, images included), then one decode step for every running row.
A row leaves the moment it is done, so a short request behind long ones waits for at most one
prefill and one step. The loop is ours because generate() cannot take rows in mid-flight:

- positions: GLM-4.6V's rotary positions are 3D (M-RoPE). A prompt's come from the model's own
  `get_rope_index`; after it, every row counts on from its own last position, so each row carries
  its next position rather than sharing the batch's column count;
- cache: `kvcache.PaddedCache` keeps the rows left-padded to one length, with the mask to match;
- sampling: `sampling.choose_tokens` applies each row's own settings, so any rows can share a step;
- prefill: at most `prefill_tokens` prompt tokens a cycle. A prompt longer than that (many images)
  is prefilled alone, a chunk per cycle, its images encoded once, while the batch goes on decoding;
- caches: images come from the encoder cache when it holds them (`encodercache`), and a prompt that
  starts as a recent one did is prefilled from where that prefix ends (`prefixcache`); the cached
  tokens count against the KV budget and are evicted before a newcomer would wait for room.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glmvision.backends.local.encodercache import (
    EncoderCache,
    encoder_cache_bytes,
    image_features,
    image_hashes,
)
from glmvision.backends.local.engine import (
    Job,
    QueueEngine,
    collate,
    fail_row,
    fail_unfinished,
    gpu_out_of_memory,
    mark_started,
    on_device,
    stop_if_gone_or_late,
)
from glmvision.backends.local.kvcache import PaddedCache, kv_bytes_per_token
from glmvision.backends.local.prefixcache import PrefixCache, prompt_keys
from glmvision.backends.local.sampling import RowSampling, choose_tokens
from glmvision.backends.local.vram import release_cuda_cache
from glmvision.core.config import Settings

log = logging.getLogger("glmvision")

# A shorter cached prefix is not worth prefilling a row on its own (rows that miss share one pass).
MIN_REUSE_TOKENS = 16


@dataclass(eq=False)
class Row:
    """A request in the running batch: its sampling, the token to feed next and that token's position."""

    job: Job
    sampling: RowSampling
    next_token: int = -1
    position: int = 0
    reused: int = 0  # prompt tokens whose KV came from the prefix cache
    reused_kv: Any = None  # that KV per layer, until its prefill


def shared_prompts(
    rows: list[Row], identity: Callable[[Row], object] | None = None
) -> tuple[list[int], list[int]]:
    """Rows whose prompt is another's share its prefill: the rows to prefill, and for each row the place
    among those of the one it copies. Prompts are the same when `identity` says so (by default: one
    inputs object, as a request's `n` choices in this process)."""
    firsts: list[int] = []
    copy_of: list[int] = []
    seen: dict[tuple[object, str | None], int] = {}
    for index, row in enumerate(rows):
        key = (identity(row) if identity is not None else id(row.job.inputs), row.job.params.adapter)
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(index)
        copy_of.append(seen[key])
    return firsts, copy_of


def prompt_positions(model: Any, inputs: dict[str, Any]) -> tuple[Any, list[int]]:
    """3D positions [3, rows, columns] of left-padded prompts, and each row's next position."""
    import torch

    mask = inputs["attention_mask"]
    if "mm_token_type_ids" in inputs:
        positions, _ = model.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=mask,
        )
    else:  # text only, as the processor of a text-only model gives it
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    # Padding sits at position 0, so a row's largest position is that of its last prompt token.
    following = positions.amax(dim=(0, 2)) + 1
    return positions.to(torch.long), following.tolist()


def image_spans(model: Any, inputs: dict[str, Any]) -> list[tuple[int, int, int]]:
    """Each image of left-padded prompts as (row, first column, tokens), in the order of its pixels."""
    grids = inputs.get("image_grid_thw")
    if grids is None:
        return []
    merge = int(model.model.config.vision_config.spatial_merge_size) ** 2
    counts = [int(n) // merge for n in grids.prod(dim=-1).tolist()]
    image_id = model.model.config.image_token_id
    spans, index = [], 0
    types = inputs.get("mm_token_type_ids")
    for row, ids in enumerate(inputs["input_ids"].tolist()):
        if types is not None:  # a video's frames use the image token too: those are not images
            ids = [-1 if kind == 2 else token for token, kind in zip(ids, types[row].tolist(), strict=True)]
        column = 0
        while index < len(counts):
            try:
                column = ids.index(image_id, column)
            except ValueError:
                break
            spans.append((row, column, counts[index]))
            column += counts[index]
            index += 1
    return spans


def prompt_embeddings(
    model: Any,
    inputs: dict[str, Any],
    hashes: list[int] | None = None,
    cache: EncoderCache | None = None,
    start: int = 0,
) -> Any:
    """Left-padded prompts' input embeddings [rows, tokens, hidden] from column `start` on, their
    images' features in place (from `cache` when it holds them, by `hashes`, one per image)."""
    import torch

    inner = model.model.model
    ids = inputs["input_ids"][:, start:]
    embeds = inner.get_input_embeddings()(ids)
    if "pixel_values_videos" in inputs:
        embeds = video_embeddings(model, inputs, embeds, start)
    if "pixel_values" not in inputs:
        return embeds
    spans = image_spans(model, inputs)
    wanted = [i for i, (_, column, count) in enumerate(spans) if column + count > start]
    if not wanted:
        return embeds
    if hashes is None or len(hashes) != len(spans):
        hashes, cache = list(range(len(spans))), None
    features = image_features(model, inputs, hashes, wanted, cache)
    pieces = []
    for index, part in zip(wanted, features, strict=True):
        _, column, _ = spans[index]
        pieces.append(part[max(0, start - column) :])  # an image the prefix cuts keeps its tail only
    flat = torch.cat(pieces, dim=0).to(embeds.device, embeds.dtype)
    where = ids == model.model.config.image_token_id
    if "mm_token_type_ids" in inputs:
        where &= inputs["mm_token_type_ids"][:, start:] != 2  # video frames share the image token
    return embeds.masked_scatter(where[..., None].expand_as(embeds), flat)


def video_embeddings(model: Any, inputs: dict[str, Any], embeds: Any, start: int = 0) -> Any:
    """`embeds` (from column `start` on) with the videos' features in their tokens' places (token
    type 2); videos are never in the encoder or prefix cache, so each is encoded here."""
    import torch

    out = model.model.model.get_video_features(
        inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
    )
    videos = inputs["mm_token_type_ids"] == 2
    flat = torch.cat(list(out.pooler_output), dim=0)[int(videos[:, :start].sum()) :]
    where = videos[:, start:][..., None].expand_as(embeds)
    return embeds.masked_scatter(where, flat.to(embeds.device, embeds.dtype))


@dataclass(eq=False)
class ChunkedPrefill:
    """A newcomer whose prompt is longer than one cycle's prefill budget, prefilled a chunk per cycle."""

    job: Job
    embeds: Any  # [1, tokens, hidden], from column `reused` of the prompt on
    positions: Any  # [3, 1, tokens]
    following: int  # the position of its first generated token
    cache: Any  # its own DynamicCache until it joins the batch
    done: int = 0  # prompt tokens in its cache so far
    reused: int = 0  # of which the prefix cache gave


class ContinuousEngine(QueueEngine):
    """Iteration-level scheduling: rows join at the next decode step and leave when they finish."""

    scheduler = "continuous"

    def __init__(self, model: Any, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, settings, *args, **kwargs)
        self.prefill_tokens = settings.max_prefill_tokens  # per cycle; a longer prompt goes in chunks
        self._rows: list[Row] = []
        self._joining: list[Job] = []
        self._chunked: ChunkedPrefill | None = None
        self._cache: PaddedCache | None = None
        self._stop_tensor: Any = None
        self._stop_ids: frozenset[int] = frozenset()
        config = getattr(getattr(self._model, "model", None), "config", None)
        self._sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
        device = str(getattr(model, "device", "cpu"))
        encoder_bytes = encoder_cache_bytes(settings.encoder_cache_mb, device)
        self.encoder_cache = EncoderCache(encoder_bytes) if encoder_bytes else None
        self.prefix_cache: PrefixCache | None = None
        if settings.prefix_cache and config is not None:
            dtype = getattr(self._model.model, "dtype", None)
            element = dtype.itemsize if dtype is not None else 4
            per_token = kv_bytes_per_token(config.get_text_config(), element)
            self.prefix_cache = PrefixCache(self.max_tokens, per_token)

    def _held(self) -> list[Job]:
        chunked = [self._chunked.job] if self._chunked is not None else []
        return [*self._joining, *chunked, *(row.job for row in self._rows)]

    def _serve_alone(self, job: Job) -> None:
        self._join([job])
        while self._rows:
            self._step()
        self._count_caches()

    def _cycle(self) -> None:
        # Rows whose client left or whose deadline passed were dropped at the end of the last step.
        if self._chunked is None:  # while one is chunked, the queue waits behind it
            newcomers = self._admit()
            if len(newcomers) == 1 and newcomers[0].prompt_tokens > self.prefill_tokens:
                self._start_chunked(newcomers[0])
            elif newcomers:
                self._join(newcomers)
            self._joining = []  # only now: if the model fails in their prefill, they are still held
        if self._chunked is not None:
            self._prefill_chunk(self._chunked)
        if self._rows:
            self._step()
        if not self._rows and self._chunked is None:
            self._tidy_memory()
        self._count_caches()

    # Admission.

    def _admit(self) -> list[Job]:
        with self._cond:
            if not self._rows:
                # Idle: one prefill of 8 costs far less than 8 of one. Once rows run, nobody waits.
                self._wait_for_work()
            self._joining = self._take()
            return self._joining

    def _take(self) -> list[Job]:
        """Newcomers, first come first served, while rows, cache at full length and prefill fit."""
        now = time.monotonic()
        taken: list[Job] = []
        rows = len(self._rows)
        # Padded rows grow to the longest row's length: the cache at full length is rows x longest.
        longest = max((row.job.full_length for row in self._rows), default=0)
        prefill = 0
        while self._queue and rows + len(taken) < self.max_batch:
            job = self._queue[0]
            if self._expire(job, now):
                self._queue.popleft()
                continue
            grown = max(longest, job.full_length)
            # Alone a request always runs (its size was bounded on arrival); beside others it waits
            # for room, and nobody overtakes it. One newcomer per cycle always gets its prefill.
            # Cached prefixes give their room up first.
            needed = (rows + len(taken) + 1) * grown
            if self.prefix_cache is not None:
                self.prefix_cache.shrink(self.max_tokens - needed)
            too_big = (rows or taken) and needed > self.max_tokens
            if too_big or (taken and prefill + job.prompt_tokens > self.prefill_tokens):
                break
            self._queue.popleft()
            taken.append(job)
            longest, prefill = grown, prefill + job.prompt_tokens
            if prefill > self.prefill_tokens:
                break  # a prompt longer than the budget is prefilled alone, in chunks
        return taken

    # Model work.

    def _join(self, jobs: list[Job]) -> None:
        """Prefill newcomers together, give each its first token, and merge them into the batch."""
        mark_started(jobs)
        rows = [Row(job, sampling) for job in jobs if (sampling := self._sampling(job)) is not None]
        if len(rows) < len(jobs):
            self._record(len(jobs) - len(rows))
        if rows:
            self._join_rows(rows)

    def _join_rows(self, rows: list[Row]) -> None:
        import torch

        try:
            with torch.inference_mode():
                cache = self._prefill(rows)
        except torch.OutOfMemoryError:
            self._drop_caches()
            if len(rows) > 1:
                release_cuda_cache()
                self.stats.oom_splits += 1
                log.warning("out of GPU memory prefilling %d requests: retrying in halves", len(rows))
                half = len(rows) // 2
                self._join_rows(rows[:half])
                self._join_rows(rows[half:])
            else:
                self._out_of_memory_alone(rows[0].job)
            return
        self._merge(rows, cache)

    def _sampling(self, job: Job) -> RowSampling | None:
        """A newcomer's sampling (its grammar started, its generator seeded); None, with the request
        answered, when making it failed."""
        try:
            return RowSampling.for_params(job.params, self._model.model.device, job.constraint)
        except Exception as exc:
            log.exception("preparing a row's sampling failed: that row alone fails")
            fail_row(job, exc)
            return None

    def _merge(self, rows: list[Row], cache: PaddedCache) -> None:
        """Add prefilled rows (their first token chosen) to the running batch."""
        if self._cache is None:
            self._cache = cache
        else:
            self._cache.join(cache)
        self._rows.extend(rows)
        if self.prefix_cache is not None:  # running rows' room comes before cached prefixes
            longest = max(row.job.full_length for row in self._rows)
            self.prefix_cache.shrink(self.max_tokens - len(self._rows) * longest)
        self.beat(len(rows))
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._rows))
        self._leave_if_done()

    def _start_chunked(self, job: Job) -> None:
        """Set up a long prompt's chunked prefill: its embeddings (images encoded once) and positions."""
        import torch
        from transformers import DynamicCache

        model = self._model
        mark_started([job])
        reused, reused_kv = self._look_up_prefix(job)
        cache = DynamicCache(config=model.model.config)
        try:
            with torch.inference_mode():
                inputs = on_device(model, {k: v for k, v in job.inputs.items() if k != "image_hashes"})
                positions, following = prompt_positions(model, inputs)
                embeds = prompt_embeddings(model, inputs, self._hashes(job), self.encoder_cache, reused)
                for layer, (keys, values) in enumerate(reused_kv):
                    cache.update(keys, values, layer)
        except torch.OutOfMemoryError:
            self._drop_caches()
            self._out_of_memory_alone(job)
            return
        self._chunked = ChunkedPrefill(
            job, embeds, positions, following[0], cache, done=reused, reused=reused
        )

    def _prefill_chunk(self, chunked: ChunkedPrefill) -> None:
        """Prefill the next `prefill_tokens` of a long prompt; once it is whole, it joins the batch."""
        import torch

        self.expire_waiting()  # the queue's limits hold while it waits behind a chunked prompt
        job = chunked.job
        # Not one token yet, so the queue's rules apply: gone, past its deadline (504), waited too long.
        if self._expire(job, time.monotonic()):
            self._chunked = None
            self._record(1)
            return
        total = chunked.reused + chunked.embeds.shape[1]
        start, end = chunked.done, min(chunked.done + self.prefill_tokens, total)
        mask = torch.ones((1, end), dtype=torch.long, device=chunked.embeds.device)
        model = self._model
        offset = chunked.reused
        try:
            with torch.inference_mode():
                out = model.forward(
                    [job.params.adapter],
                    inputs_embeds=chunked.embeds[:, start - offset : end - offset],
                    position_ids=chunked.positions[:, :, start:end],
                    attention_mask=mask,
                    cache=chunked.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                chunked.done = end
                self.beat()
                if end < total:
                    return
                sampling = self._sampling(job)
                if sampling is None:
                    self._chunked = None
                    self._record(1)
                    return
                row = Row(job, sampling, position=chunked.following)
                self._choose([row], out.logits[:, -1])
        except torch.OutOfMemoryError:
            self._chunked = None
            self._out_of_memory_alone(job)
            return
        self._chunked = None
        padded = PaddedCache(chunked.cache, mask)
        self._keep_prefixes([row], padded)
        self._merge([row], padded)

    def _out_of_memory_alone(self, job: Job) -> None:
        release_cuda_cache()
        log.warning("out of GPU memory prefilling one request; cache emptied")
        fail_unfinished([job], gpu_out_of_memory())

    def _prefill(self, rows: list[Row]) -> PaddedCache:
        """Prefill the newcomers: those whose prompt starts as a cached one each from where it ends,
        the rest in one forward pass; each row gets its position and first token."""
        for row in rows:
            row.reused, row.reused_kv = self._look_up_prefix(row.job)
        reusing = [row for row in rows if row.reused]
        fresh = [row for row in rows if not row.reused]
        caches = [self._prefill_after_prefix(row) for row in reusing]
        if fresh:
            caches.append(self._prefill_together(fresh))
        joined = caches[0]
        for cache in caches[1:]:
            joined.join(cache)
        rows[:] = [*reusing, *fresh]  # the order of the joined cache's rows
        return joined

    def _prefill_together(self, rows: list[Row]) -> PaddedCache:
        """One forward pass over whole prompts, left-padded to one length; rows with one prompt (a
        request's `n` choices) are prefilled once and the others get a copy of its KV."""
        from transformers import DynamicCache

        model = self._model
        firsts, copy_of = shared_prompts(rows, self._prompt_identity)
        leaders = [rows[i] for i in firsts]
        features = [row.job.inputs for row in leaders]
        inputs = on_device(model, collate(features, model.pad_id))
        positions, following = prompt_positions(model, inputs)
        cache = DynamicCache(config=model.model.config)
        hashes = [image_hash for row in leaders for image_hash in self._hashes(row.job)]
        embeds = prompt_embeddings(model, inputs, hashes, self.encoder_cache)
        out = model.forward(
            [row.job.params.adapter for row in leaders],
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        padded = PaddedCache(cache, inputs["attention_mask"])
        self._keep_prefixes(leaders, padded)
        logits = out.logits[:, -1]
        if len(leaders) < len(rows):
            self.stats.shared_prefills += len(rows) - len(leaders)
            padded.keep(copy_of)  # the copies' KV: rows of their leader's
            logits = logits[copy_of]
        for row, leader in zip(rows, copy_of, strict=True):
            row.position = following[leader]
        self._choose(rows, logits)
        return padded

    def _prefill_after_prefix(self, row: Row) -> PaddedCache:
        """Prefill one prompt from where its cached prefix ends."""
        import torch
        from transformers import DynamicCache

        model, job, start = self._model, row.job, row.reused
        inputs = on_device(model, {k: v for k, v in job.inputs.items() if k != "image_hashes"})
        positions, following = prompt_positions(model, inputs)
        embeds = prompt_embeddings(model, inputs, self._hashes(job), self.encoder_cache, start)
        cache = DynamicCache(config=model.model.config)
        for layer, (keys, values) in enumerate(row.reused_kv):
            cache.update(keys, values, layer)
        row.reused_kv = None
        length = int(inputs["input_ids"].shape[1])
        mask = torch.ones((1, length), dtype=torch.long, device=embeds.device)
        out = model.forward(
            [job.params.adapter],
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions[:, :, start:],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        row.position = following[0]
        self._choose([row], out.logits[:, -1])
        padded = PaddedCache(cache, mask)
        self._keep_prefixes([row], padded)
        return padded

    # Caches.

    def _hashes(self, job: Job) -> list[int]:
        if job.image_hashes is None:
            job.image_hashes = image_hashes(job.inputs)
        return job.image_hashes

    def _prompt_identity(self, row: Row) -> object:
        """What makes two prompts the same: their keys (token ids, images by hash), so that identical
        prompts sent apart (a request's `n` choices from an engine process, two clients asking the
        same) are prefilled once; the inputs object when the prompt has no keys."""
        keys = self._keys(row.job)
        return keys.tobytes() if keys is not None else id(row.job.inputs)

    def _keys(self, job: Job) -> Any:
        """The prompt's keys for the prefix cache (None: it cannot take part), made once per job: the
        lookup, the prefill's sharing and the insert each ask."""
        if job.prompt_keys is None:
            keys = self._make_keys(job)
            job.prompt_keys = False if keys is None else keys
        return None if job.prompt_keys is False else job.prompt_keys

    def _make_keys(self, job: Job) -> Any:
        inputs = job.inputs
        grids = inputs.get("image_grid_thw")
        merge = int(self._model.model.config.vision_config.spatial_merge_size) ** 2
        counts = [] if grids is None else [int(n) // merge for n in grids.prod(dim=-1).tolist()]
        types = inputs.get("mm_token_type_ids")
        return prompt_keys(
            inputs["input_ids"][0].tolist(),
            None if types is None else types[0].tolist(),
            self._hashes(job),
            counts,
        )

    def _look_up_prefix(self, job: Job) -> tuple[int, list[tuple[Any, Any]]]:
        """The prompt's longest cached prefix, leaving at least one token to prefill: its length
        (0 when none worth using) and its KV per layer."""
        cache = self.prefix_cache
        keys = self._keys(job) if cache is not None else None
        if cache is None or keys is None:
            return 0, []
        reused, kv = cache.match(job.params.adapter, keys, len(keys) - 1, MIN_REUSE_TOKENS)
        if not reused:
            return 0, []
        job.stream.cached_tokens = reused  # reported in usage.prompt_tokens_details
        return reused, kv

    def _keep_prefixes(self, rows: list[Row], padded: PaddedCache) -> None:
        """Put each newly prefilled prompt's KV in the prefix cache."""
        cache = self.prefix_cache
        if cache is None:
            return
        length = padded.length
        for index, row in enumerate(rows):
            keys = self._keys(row.job)
            if keys is None:
                continue
            start = length - len(keys)  # rows are left-padded: the prompt ends at the last column
            kv = [
                (layer.keys[index : index + 1, :, start:], layer.values[index : index + 1, :, start:])
                for layer in padded.cache.layers
            ]
            cache.insert(row.job.params.adapter, keys, kv)

    def _count_caches(self) -> None:
        """Copy the caches' counters into the engine's (read by /readyz and /metrics)."""
        stats, prefix, encoder = self.stats, self.prefix_cache, self.encoder_cache
        if prefix is not None:
            stats.prefix_hits, stats.prefix_misses = prefix.stats.hits, prefix.stats.misses
            stats.prefix_reused_tokens, stats.prefix_evictions = (
                prefix.stats.hit_tokens,
                prefix.stats.evictions,
            )
            stats.prefix_tokens, stats.prefix_bytes = prefix.tokens, prefix.bytes
        if encoder is not None:
            stats.encoder_hits, stats.encoder_misses = encoder.stats.hits, encoder.stats.misses
            stats.encoder_evictions, stats.encoder_bytes = encoder.stats.evictions, encoder.bytes

    def _drop_caches(self) -> None:
        """GPU memory ran out: what the caches hold goes first."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        if self.encoder_cache is not None:
            self.encoder_cache.clear()

    def _step(self) -> None:
        """One decode step for every running row."""
        import torch

        assert self._cache is not None
        model, cache = self._model, self._cache
        device = model.model.device
        before = cache.length
        try:
            with torch.inference_mode():
                ids = torch.tensor([[row.next_token] for row in self._rows], device=device)
                positions = torch.tensor([row.position for row in self._rows], device=device)
                mask = cache.grow()
                if self._sdpa:
                    # One query per row attends to every column its mask keeps: that is the whole
                    # 4D mask, and handing it over spares transformers building it every step.
                    mask = mask[:, None, None, :].bool()
                out = model.forward(
                    [row.job.params.adapter for row in self._rows],
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions.view(1, -1, 1).expand(3, -1, -1),
                    cache=cache.cache,
                    use_cache=True,
                )
                self._choose(self._rows, out.logits[:, -1])
        except torch.OutOfMemoryError:
            # Layers that took this step's keys before memory ran out give them back: the cache
            # must stay one length. The newest row leaves with a 503 and the rest try again.
            cache.truncate(before)
            release_cuda_cache()
            self.stats.oom_evictions += 1
            newest = self._rows[-1]
            log.warning("out of GPU memory on a step of %d rows: the newest one leaves", len(self._rows))
            fail_unfinished([newest.job], gpu_out_of_memory())
            self._leave_if_done()
            return
        for row in self._rows:
            row.position += 1  # the token just fed took its position
        self.stats.steps += 1
        self.beat(len(self._rows))
        self.expire_waiting()
        self._leave_if_done(check_clients=True)

    def _choose(self, rows: list[Row], logits: Any) -> None:
        """Pick each row's next token from its last logits and hand it to its request."""
        import torch

        if self._stop_tensor is None:  # the model's stop ids never change: made once, on its device
            self._stop_ids = frozenset(self._model.stop_ids)
            self._stop_tensor = torch.tensor(self._model.stop_ids, device=logits.device)
        tokens = choose_tokens(
            logits, [row.sampling for row in rows], [row.job.generated for row in rows], self._stop_tensor
        )
        for row, token in zip(rows, tokens, strict=True):
            if isinstance(token, Exception):  # that row alone fails; it leaves at _leave_if_done
                fail_row(row.job, token)
                continue
            row.next_token = token
            row.job.take(token, self._stop_ids, row.sampling.last_logprobs)

    def _leave_if_done(self, check_clients: bool = False) -> None:
        """Drop finished rows (and, when asked, rows whose client left or whose deadline passed)."""
        if check_clients:
            now = time.monotonic()
            for row in self._rows:
                stop_if_gone_or_late(row.job, self.stats, now)
        staying = [i for i, row in enumerate(self._rows) if not row.job.finished]
        if len(staying) == len(self._rows):
            return
        done = len(self._rows) - len(staying)
        self._rows = [self._rows[i] for i in staying]
        if not self._rows:
            self._cache = None
        elif self._cache is not None:
            self._cache.keep(staying)
        self._record(done)
