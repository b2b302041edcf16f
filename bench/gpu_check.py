#!/usr/bin/env python3
"""The GPU check (issue 23): real-size GLM-4.6V-Flash speed and memory through glmvision's own engine.

`bash bench/gpu_check.sh` builds a random-weight `Glm4vConfig()` model (10.29 B parameters, bf16)
directly on the GPU, with the demo model's processor (full image budget) and its token ids, and
drives the continuous scheduler in-process (no HTTP): load time, single-stream decode against the
memory-bandwidth limit, 8-client throughput, the mixed-load ratio, follow-up TTFT with the caches
off and on, peak GPU memory against the KV budget, and greedy batched-vs-solo token identity. Each
phase has its own timeout and the whole run a time limit; it ends with a `name: value` summary.
`--cpu-smoke` runs the same phases on the CPU with the tiny demo-sized config in fp32 (the tests do).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmvision.postprocess.stream import GenerationStream

# GB/s (10^9 bytes) of HBM, by the first pattern all of whose words the device name contains.
BANDWIDTH_GBS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4800.0),
    (("H100", "PCIE"), 2000.0),
    (("H100",), 3350.0),  # SXM (HBM3)
    (("A100", "80GB"), 2000.0),
)
GIB = 1 << 30
BASELINE_STEPS = 5  # the mixed-load phase's shortest baseline, in decode steps of the short rows
PREFIX = "gpu-check:"

# Phase order; the summary says how many of them ran to the end.
PHASES = ("warm_up", "decode", "throughput", "mixed_load", "identity", "followup")


class PhaseTimeout(Exception):
    """A phase's requests did not finish inside its timeout."""


@dataclass(frozen=True)
class Workload:
    """How much each phase asks for (real size on a GPU, or the CPU smoke's tiny amounts)."""

    decode_tokens: int
    clients: int
    client_tokens: int
    client_image: tuple[int, int]
    short_rows: int
    short_tokens: int
    baseline_s: float
    large_image: tuple[int, int]
    identity_tokens: int
    followup_tokens: int
    followup_repeats: int


REAL = Workload(
    decode_tokens=128,
    clients=8,
    client_tokens=256,
    client_image=(448, 448),
    short_rows=7,
    short_tokens=2048,
    baseline_s=3.0,
    large_image=(2048, 1536),
    identity_tokens=32,
    followup_tokens=32,
    followup_repeats=3,
)
SMOKE = Workload(
    decode_tokens=16,
    clients=8,
    client_tokens=12,
    client_image=(112, 112),
    short_rows=7,
    short_tokens=400,
    baseline_s=0.3,
    large_image=(448, 336),
    identity_tokens=12,
    followup_tokens=8,
    followup_repeats=1,
)


def log(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


def bandwidth_for(name: str, override: float | None) -> float | None:
    """HBM bandwidth in GB/s: the flag when given, else the table's figure for this device name."""
    if override:
        return override
    upper = name.upper()
    for words, gbs in BANDWIDTH_GBS:
        if all(word in upper for word in words):
            return gbs
    return None


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def synthetic_image(size: tuple[int, int], seed: int) -> Any:
    """A noisy gradient photo stand-in; a different seed gives different pixels (no cache hit)."""
    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = (x * (0.3 + 0.1 * (seed % 5)) + y * 0.5 + rng.integers(0, 255, 3)) % 256
    noise = rng.normal(0, 24, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"), "RGB")


def user(text: str, *images: Any) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}],
    }


class TimedStream(GenerationStream):
    """A request's stream that notes when each token arrived; nobody reads its deltas."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []  # perf_counter() of each token, as the engine handed it over
        self.ids: list[int] = []
        self.done = threading.Event()
        self.error: Exception | None = None
        self.submitted = time.perf_counter()
        self.ended = 0.0

    def put(self, token_ids: list[int]) -> None:
        now = time.perf_counter()
        self.times.extend(now for _ in token_ids)
        self.ids.extend(token_ids)
        super().put(token_ids)

    def fail(self, error: Exception) -> None:
        self.error = error
        self.ended = time.perf_counter()
        super().fail(error)
        self.done.set()

    def end(self) -> None:
        self.ended = time.perf_counter()
        super().end()
        self.done.set()

    def decode_rate(self) -> float | None:
        """Tokens per second after the first (the prefill's) token."""
        times = self.times
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None

    def count(self, start: float, end: float) -> int:
        return sum(1 for t in self.times if start <= t < end)

    def gaps(self, start: float, end: float) -> list[float]:
        times = [t for t in self.times if start <= t < end]
        return [b - a for a, b in itertools.pairwise(times)]


class Check:
    """One run: the model, its engines, the streams' timing and the summary lines."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = SMOKE if args.workload == "smoke" else REAL
        self.summary: dict[str, str] = {}
        self.started = time.monotonic()
        self.deadline = self.started + args.time_limit
        self.peak_bytes = 0
        self._sampling = threading.Event()
        self.loaded: Any = None
        self.engine: Any = None

    # Summary.

    def put(self, name: str, value: object) -> None:
        self.summary[name] = str(value)
        log(f"{name} = {value}")

    def print_summary(self) -> None:
        self.summary["total_s"] = f"{time.monotonic() - self.started:.1f}"
        lines = ["== gpu_check summary ==", *(f"{k}: {v}" for k, v in self.summary.items()), "== end =="]
        print("\n".join(lines), flush=True)

    # Time limits.

    def phase_deadline(self) -> float:
        return min(self.deadline, time.monotonic() + self.args.phase_timeout)

    def run_phase(self, name: str, body: Callable[[float], None]) -> bool:
        """Run one phase under its timeout; a failure or timeout is reported and the next phase runs."""
        if time.monotonic() >= self.deadline:
            self.put(f"phase_{name}", "skipped (time limit)")
            return False
        begin = time.monotonic()
        log(f"phase {name} ...")
        try:
            body(self.phase_deadline())
        except PhaseTimeout as exc:
            self.put(f"phase_{name}", f"timeout ({exc})")
            return False
        except Exception as exc:  # noqa: BLE001 - reported in the summary; the next phase runs
            traceback.print_exc()
            self.put(f"phase_{name}", f"failed ({type(exc).__name__}: {exc})".replace("\n", " "))
            return False
        self.put(f"phase_{name}", f"ok ({time.monotonic() - begin:.1f}s)")
        return True

    # Model and engines.

    def load(self) -> None:
        import torch
        import transformers
        from transformers import AutoConfig, AutoProcessor, GenerationConfig, Glm4vConfig

        from glmvision.backends.local.demo import build_demo_model
        from glmvision.backends.local.loading import torch_threads
        from glmvision.backends.local.runtime import LoadedModel

        args = self.args
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        directory = build_demo_model(
            Path(tempfile.mkdtemp(prefix="glmvision-gpucheck-")), full_image_budget=True
        )
        processor = AutoProcessor.from_pretrained(directory)
        processor.tokenizer.padding_side = "left"
        demo = AutoConfig.from_pretrained(directory)
        if args.config == "real":
            config = Glm4vConfig()
            # The demo processor writes its own token ids; the model must read the same ones.
            for key in (
                "image_token_id",
                "video_token_id",
                "image_start_token_id",
                "image_end_token_id",
                "video_start_token_id",
                "video_end_token_id",
            ):
                setattr(config, key, getattr(demo, key))
            config.text_config.pad_token_id = demo.text_config.pad_token_id
            # Glm4vConfig() leaves out the real model's partial rotary factor (0.5), so its default
            # M-RoPE sections [8, 12, 12] (32 = 128 x 0.5 / 2) do not fit and the first forward fails.
            config.text_config.rope_parameters = {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [8, 12, 12],
            }
        else:
            config = demo
        if args.layers:  # a cut-down model of the same widths, to try the real config where memory is short
            config.text_config.num_hidden_layers = args.layers
            config.vision_config.depth = args.layers
        dtype = getattr(torch, args.dtype)
        device = args.device
        if device.startswith("cuda"):
            torch.cuda.init()
            torch.cuda.synchronize()
        began = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.Glm4vForConditionalGeneration._from_config(config, dtype=dtype)
        model.eval()
        model.generation_config = GenerationConfig.from_pretrained(directory)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        load_s = time.perf_counter() - began
        parameters = sum(p.numel() for p in model.parameters())
        threads = torch_threads(0, parameters)
        if threads:
            torch.set_num_threads(threads)
        self.loaded = LoadedModel(
            processor=processor,
            model=model,
            model_id="glm-4.6v-flash-random",
            device=device,
            dtype=args.dtype,
            demo=True,
            load_seconds=load_s,
            processor_copies=8,
        )
        element = torch.finfo(dtype).bits // 8
        visual = sum(p.numel() for p in model.model.visual.parameters())
        embedding = model.model.language_model.embed_tokens.weight.numel()
        self.weight_bytes = parameters * element
        # A decode step reads every weight of the language model and lm_head, not the vision tower and
        # only one row per token of the embedding table.
        self.decode_bytes = (parameters - visual - embedding) * element
        self.put("mode", "cpu-smoke" if args.cpu_smoke else "gpu")
        self.put("device", torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu")
        self.put("dtype", args.dtype)
        self.put("attention", model.config._attn_implementation)
        self.put("parameters", parameters)
        self.put("weights_gib", f"{self.weight_bytes / GIB:.2f}")
        self.put("load_s", f"{load_s:.2f}")
        if device.startswith("cuda"):
            threading.Thread(target=self._sample_peak, name="gpu-check-peak", daemon=True).start()

    def _sample_peak(self) -> None:
        # The engine resets the peak counter whenever it falls idle (QueueEngine._tidy_memory), so
        # read it often rather than once at the end.
        import torch

        while not self._sampling.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.args.device))

    def settings(self, caches: bool) -> Any:
        from glmvision.core.config import load_settings

        return load_settings(
            {
                "GLMVISION_DEVICE": self.args.device,
                "GLMVISION_SCHEDULER": "continuous",
                "GLMVISION_MAX_BATCH_SIZE": 8,
                "GLMVISION_MAX_BATCH_TOKENS": self.args.max_batch_tokens,
                "GLMVISION_ENCODER_CACHE_MB": -1 if caches else 0,
                "GLMVISION_PREFIX_CACHE": caches,
                "GLMVISION_REQUEST_TIMEOUT": max(1.0, self.args.phase_timeout),
                "GLMVISION_QUEUE_TIMEOUT": max(1.0, self.args.phase_timeout),
            }
        )

    def make_engine(self, caches: bool) -> tuple[Any, list[int]]:
        """A continuous engine as the service makes it, and the counter of requests about to arrive
        (while it is above 0 an idle engine waits, up to its batch wait, for them to queue)."""
        from glmvision.backends.local.backend import make_engine

        arriving = [0]
        return make_engine(self.loaded, self.settings(caches), arriving=lambda: arriving[0]), arriving

    def prepare(self, messages: list[dict[str, Any]]) -> Any:
        return self.loaded.prepare(messages, enable_thinking=False)

    def submit(self, engine: Any, inputs: Any, tokens: int, timeout: float) -> TimedStream:
        """Queue one greedy request that generates exactly `tokens` tokens."""
        from glmvision.core.backend import Ticket
        from glmvision.core.generation import GenerationParams

        params = GenerationParams(tokens, temperature=0.0, min_new_tokens=tokens)
        ticket = Ticket.unheld(timeout)
        stream = TimedStream(self.loaded, int(inputs["input_ids"].shape[1]), params, ticket.deadline)
        engine.submit(inputs, params, ticket, stream=stream)
        return stream

    @contextmanager
    def together(self, arriving: list[int], count: int) -> Iterator[None]:
        """Submissions inside the block reach an idle engine as one batch."""
        arriving[0] = count
        try:
            yield
        finally:
            arriving[0] = 0

    # Phases.

    def warm_up(self, deadline: float) -> None:
        """The service's own warm-up, then one large image: kernels for that shape are ready before
        anything is timed."""
        from glmvision.backends.local.backend import first_answer
        from glmvision.core.backend import Ticket

        engine, _ = self.make_engine(caches=True)
        first_answer(self.loaded, engine, Ticket.unheld(deadline - time.monotonic()))
        self.engine = engine
        inputs = self.prepare([user("Warm up.", synthetic_image(self.work.large_image, 0))])
        wait([self.submit(engine, inputs, 2, deadline - time.monotonic())], deadline)

    def decode(self, deadline: float) -> None:
        work = self.work
        inputs = self.prepare([user("Describe this picture in detail.", synthetic_image((448, 448), 1))])
        stream = self.submit(self.engine, inputs, work.decode_tokens, deadline - time.monotonic())
        wait([stream], deadline)
        rate = stream.decode_rate()
        self.put("decode_tokens", len(stream.times))
        self.put("decode_tok_s", fmt(rate))
        bandwidth = bandwidth_for(self.summary["device"], self.args.bandwidth_gbs)
        limit = bandwidth * 1e9 / self.decode_bytes if bandwidth else None
        log(
            f"bandwidth limit = {fmt(bandwidth, 0)} GB/s / {self.decode_bytes / 1e9:.2f} GB read per step "
            "(language model + lm_head weights)"
        )
        self.put("decode_limit_tok_s", fmt(limit))
        self.put("decode_bandwidth_ratio", fmt(rate / limit if limit and rate else None, 3))

    def throughput(self, deadline: float) -> None:
        work = self.work
        prepared = [
            self.prepare(
                [user(f"Client {i}: what is in this picture?", synthetic_image(work.client_image, 100 + i))]
            )
            for i in range(work.clients)
        ]
        engine, arriving = self.make_engine(caches=True)
        began = time.perf_counter()
        with self.together(arriving, len(prepared)):
            streams = [
                self.submit(engine, inputs, work.client_tokens, deadline - time.monotonic())
                for inputs in prepared
            ]
        wait(streams, deadline)
        ended = max(s.ended for s in streams)
        tokens = sum(len(s.times) for s in streams)
        self.put("throughput_clients", len(streams))
        self.put("throughput_largest_batch", engine.stats.largest_batch)
        self.put("throughput_tok_s", f"{tokens / (ended - began):.2f}")

    def mixed_load(self, deadline: float) -> None:
        """Short rows' decode rate while a long image prompt arrives, against their rate alone."""
        work = self.work
        short = [
            self.prepare([user(f"Row {i}: tell a long story about boats.")]) for i in range(work.short_rows)
        ]
        image = synthetic_image(work.large_image, 7)
        long = self.prepare([user("Describe everything in this photo.", image)])
        engine, arriving = self.make_engine(caches=True)
        timeout = deadline - time.monotonic()
        with self.together(arriving, len(short)):
            rows = [self.submit(engine, inputs, work.short_tokens, timeout) for inputs in short]
        newcomer: TimedStream | None = None
        try:
            wait_until(lambda: all(len(r.times) >= 3 for r in rows), deadline, "short rows starting")
            alone_from = time.perf_counter()
            counts = [len(r.times) for r in rows]
            # At least baseline_s and BASELINE_STEPS steps alone, however slow a step is.
            wait_until(
                lambda: (
                    time.perf_counter() - alone_from >= work.baseline_s
                    and all(len(r.times) - c >= BASELINE_STEPS for r, c in zip(rows, counts, strict=True))
                ),
                deadline,
                "short rows' baseline steps",
            )
            arrived = time.perf_counter()
            newcomer = self.submit(engine, long, 8, deadline - time.monotonic())
            wait_until(
                lambda: bool(newcomer.times) or newcomer.done.is_set(), deadline, "long request's first token"
            )
            if newcomer.error is not None:
                raise RuntimeError(f"the long request failed: {newcomer.error}")
            first = newcomer.times[0]
            if any(r.done.is_set() for r in rows):
                raise RuntimeError("a short row ended before the measurement did: raise short_tokens")
        finally:
            for stream in [*rows, *([newcomer] if newcomer else [])]:
                stream.close()
        wait([*rows, *([newcomer] if newcomer else [])], deadline, check=False)
        alone = sum(r.count(alone_from, arrived) for r in rows) / (arrived - alone_from)
        during = sum(r.count(arrived, first) for r in rows) / max(first - arrived, 1e-9)
        gaps = [g for r in rows for g in r.gaps(alone_from, arrived)]
        longest = max((g for r in rows for g in r.gaps(arrived, first + 1.0)), default=0.0)
        log(
            f"mixed load: {len(rows)} short rows decode alone for {arrived - alone_from:.2f}s, then a "
            f"{long['input_ids'].shape[1]}-token image prompt ({work.large_image[0]}x{work.large_image[1]}) "
            "arrives; mixed_load_ratio = the short rows' total decode tok/s from its arrival to its first "
            "token, over their total tok/s alone (1.0: no slowdown)"
        )
        self.put("mixed_long_prompt_tokens", int(long["input_ids"].shape[1]))
        self.put("mixed_short_alone_tok_s", f"{alone:.2f}")
        self.put("mixed_short_during_tok_s", f"{during:.2f}")
        self.put("mixed_load_ratio", f"{during / alone:.3f}" if alone else "n/a")
        self.put("mixed_long_ttft_ms", f"{(first - arrived) * 1000:.1f}")
        self.put("mixed_step_ms", f"{statistics.median(gaps) * 1000:.2f}" if gaps else "n/a")
        self.put("mixed_longest_gap_ms", f"{longest * 1000:.1f}")

    def identity(self, deadline: float) -> None:
        """Greedy tokens of rows batched together against the same requests alone (caches off)."""
        work = self.work
        prompts = [
            [user("Hello.")],
            [user("What is in this picture?", synthetic_image((224, 224), 11))],
            [
                user(
                    "Describe the colours and the shapes you can see, one by one.",
                    synthetic_image((336, 224), 12),
                )
            ],
            [user("Write a short poem about the sea, the wind and a small red boat sailing home at dusk.")],
        ]
        prepared = [self.prepare(p) for p in prompts]
        engine, arriving = self.make_engine(caches=False)
        solo = []
        for inputs in prepared:
            stream = self.submit(engine, inputs, work.identity_tokens, deadline - time.monotonic())
            wait([stream], deadline)
            solo.append(stream.ids)
        before = engine.stats.batches
        with self.together(arriving, len(prepared)):
            streams = [
                self.submit(engine, inputs, work.identity_tokens, deadline - time.monotonic())
                for inputs in prepared
            ]
        wait(streams, deadline)
        batched = [s.ids for s in streams]
        divergences = []
        for row, (alone, together) in enumerate(zip(solo, batched, strict=True)):
            at = first_difference(alone, together)
            if at is not None:
                divergences.append(f"row{row}@{at}")
        self.put("identity_rows_matching", f"{len(prompts) - len(divergences)}/{len(prompts)}")
        self.put("identity_batched_prefills", engine.stats.batches - before)
        self.put("identity_first_divergence", ",".join(divergences) or "none")

    def followup(self, deadline: float) -> None:
        """Time to first token of a chat's second turn about one large image, caches off and on."""
        work = self.work
        results: dict[bool, list[float]] = {False: [], True: []}
        engine_side: dict[bool, list[float]] = {False: [], True: []}
        reused: dict[bool, int] = {False: 0, True: 0}
        cached: list[int] = []
        shared: int | None = 0
        seed = 1000
        engines = {caches: self.make_engine(caches)[0] for caches in (False, True)}
        for _ in range(work.followup_repeats):
            for caches in (False, True):
                seed += 1  # a new image each time: no run reuses another's work
                image = synthetic_image(work.large_image, seed)
                first = [user("Describe this photo in detail.", image)]
                inputs = self.prepare(first)
                turn1 = self.submit(
                    engines[caches], inputs, work.followup_tokens, deadline - time.monotonic()
                )
                wait([turn1], deadline)
                reply = self.loaded.decode([t for t in turn1.ids if t not in self.loaded.stop_ids])
                second = [
                    *first,
                    {"role": "assistant", "content": reply},
                    user("And what is in the top left corner?"),
                ]
                began = time.perf_counter()
                inputs2 = self.prepare(second)
                turn2 = self.submit(
                    engines[caches], inputs2, work.followup_tokens, deadline - time.monotonic()
                )
                wait([turn2], deadline)
                results[caches].append(turn2.times[0] - began)
                engine_side[caches].append(turn2.times[0] - turn2.submitted)
                reused[caches] = int(getattr(turn2, "cached_tokens", 0))  # the prefix cache's KV reuse
                history = inputs["input_ids"][0].tolist() + turn1.ids
                shared = first_difference(history, inputs2["input_ids"][0].tolist())
                if shared is None:
                    shared = len(history)
                if caches:
                    cached = turn2.ids
        # The last cached answer against the same prompt with the caches off: what reuse must not change.
        reference = self.submit(engines[False], inputs2, work.followup_tokens, deadline - time.monotonic())
        wait([reference], deadline)
        differs = first_difference(cached, reference.ids)
        off, on = statistics.median(results[False]), statistics.median(results[True])
        log(
            f"follow-up: turn 2 of a chat about one {work.large_image[0]}x{work.large_image[1]} image; "
            "TTFT = its processor call + queue + prefill until its first token, median of "
            f"{work.followup_repeats}; caches = GLMVISION_ENCODER_CACHE_MB -1/0, GLMVISION_PREFIX_CACHE 1/0"
        )
        self.put("followup_prompt_tokens", int(inputs2["input_ids"].shape[1]))
        self.put("followup_shared_prefix_tokens", shared)
        self.put("followup_ttft_ms_caches_off", f"{off * 1000:.1f}")
        self.put("followup_ttft_ms_caches_on", f"{on * 1000:.1f}")
        self.put("followup_engine_ttft_ms_caches_off", f"{statistics.median(engine_side[False]) * 1000:.1f}")
        self.put("followup_engine_ttft_ms_caches_on", f"{statistics.median(engine_side[True]) * 1000:.1f}")
        self.put("followup_speedup", f"{off / on:.2f}")
        self.put("followup_cached_tokens_caches_off", reused[False])
        self.put("followup_cached_tokens_caches_on", reused[True])
        self.put("followup_cache_identity", "match" if differs is None else f"diverges@{differs}")

    def memory(self) -> None:
        """Peak GPU memory against the KV budget the scheduler computed."""
        from glmvision.backends.local.kvcache import kv_bytes_per_token, memory_token_budget

        loaded = self.loaded
        element = loaded.model.dtype.itemsize
        per_token = kv_bytes_per_token(loaded.model.config.text_config, element)
        budget = self.engine.max_tokens if self.engine is not None else None
        memory_budget = memory_token_budget(loaded.model, loaded.device)
        self.put("kv_bytes_per_token", per_token)
        self.put("kv_budget_tokens", budget if budget is not None else "n/a")
        self.put(
            "kv_budget_source",
            "memory" if budget is not None and budget < self.args.max_batch_tokens else "setting",
        )
        self.put("kv_budget_gib", fmt(budget * per_token / GIB if budget is not None else None))
        if loaded.device.startswith("cuda"):
            import torch

            self._sampling.set()
            peak = max(self.peak_bytes, torch.cuda.max_memory_allocated(loaded.device))
            total = torch.cuda.get_device_properties(loaded.device).total_memory
            self.put("memory_budget_tokens_now", memory_budget)
            self.put("peak_allocated_gib", f"{peak / GIB:.2f}")
            self.put("peak_above_weights_gib", f"{(peak - self.weight_bytes) / GIB:.2f}")
            self.put("gpu_total_gib", f"{total / GIB:.2f}")
        else:
            self.put("peak_allocated_gib", "n/a")
            self.put("peak_above_weights_gib", "n/a")

    def run(self) -> int:
        try:
            self.load()
        except Exception as exc:  # noqa: BLE001 - reported in the summary
            traceback.print_exc()
            self.put("phase_load", f"failed ({type(exc).__name__}: {exc})")
            self.print_summary()
            return 1
        ok = 0
        for name in PHASES:
            if name != "warm_up" and self.engine is None:
                self.put(f"phase_{name}", "skipped (no engine)")
                continue
            ok += self.run_phase(name, getattr(self, name))
        self.memory()
        self.put("phases_ok", f"{ok}/{len(PHASES)}")
        self.print_summary()
        return 0 if ok == len(PHASES) else 1


def wait(streams: list[Any], deadline: float, check: bool = True) -> None:
    """Wait until every stream ended; past the deadline close them all and raise PhaseTimeout."""
    for stream in streams:
        if not stream.done.wait(max(0.0, deadline - time.monotonic())):
            for other in streams:
                other.close()
            done = sum(s.done.is_set() for s in streams)
            raise PhaseTimeout(f"{done} of {len(streams)} requests finished in time")
    if check:
        failed = [s.error for s in streams if s.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} request(s) failed: {failed[0]!r}")


def wait_until(condition: Callable[[], bool], deadline: float, what: str) -> None:
    while not condition():
        if time.monotonic() >= deadline:
            raise PhaseTimeout(f"waiting for the {what}")
        time.sleep(0.002)


def first_difference(first: list[int], second: list[int]) -> int | None:
    """The first position where the two token lists differ (a shorter one differs where it ends)."""
    for at, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return at
    return None if len(first) == len(second) else min(len(first), len(second))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny demo-sized config on the CPU in fp32")
    parser.add_argument("--config", choices=("real", "small"), help="real: Glm4vConfig(); small: the demo's")
    parser.add_argument("--device", help="default cuda (cpu with --cpu-smoke)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--workload", choices=("real", "smoke"), help="request sizes (smoke: tiny)")
    parser.add_argument("--layers", type=int, help="text layers and vision depth (default: the config's)")
    parser.add_argument("--bandwidth-gbs", type=float, help="HBM GB/s, for a GPU the table does not know")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=1 << 24,
        help="GLMVISION_MAX_BATCH_TOKENS; the default leaves the KV budget to the free GPU memory",
    )
    parser.add_argument("--time-limit", type=float, help="seconds for the whole run (default 450; smoke 120)")
    parser.add_argument("--phase-timeout", type=float, help="seconds per phase (default 150; smoke 60)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.config = args.config or ("small" if smoke else "real")
    args.workload = args.workload or ("smoke" if smoke else "real")
    args.device = args.device or ("cpu" if smoke else "cuda")
    args.dtype = args.dtype or ("float32" if smoke else "bfloat16")
    args.time_limit = args.time_limit or (120.0 if smoke else 450.0)
    args.phase_timeout = args.phase_timeout or (60.0 if smoke else 150.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        from glmvision.backends.local.hardware import resolve_device

        if not torch.cuda.is_available():
            print("no CUDA device here: run with --cpu-smoke, or on a GPU machine", file=sys.stderr)
            return 2
        args.device = resolve_device(args.device, True, torch.cuda.device_count())
    check = Check(args)

    def give_up() -> None:
        # A model call that never returns would hold the main thread: still say what was measured.
        check.put("run", f"stopped at the time limit ({args.time_limit:.0f}s + 30s)")
        check.print_summary()
        os._exit(1)

    watchdog = threading.Timer(args.time_limit + 30, give_up)
    watchdog.daemon = True
    watchdog.start()
    code = check.run()
    watchdog.cancel()
    return code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The engines' model threads are daemons waiting for work: skip a teardown that could trip on them.
    os._exit(status)
