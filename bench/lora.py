#!/usr/bin/env python3
"""LoRA adapters (issue 12): one mixed-adapter batch against one batch per adapter, on the demo model.

`.venv/bin/python bench/lora.py [--adapters 2] [--rows 8] [--tokens 32] [--runs 5]` builds the demo
model and `--adapters` LoRA adapters of rank `--rank` (random weights: speed does not care what they
learnt), loads them as GLMVISION_LORA does, and serves `--rows` greedy requests (`min_new_tokens` =
`--tokens`, spread evenly over the adapters) through each scheduler's own code, in this thread:

- mixed:   every row in one batch, each through its own adapter (PEFT's `adapter_names`);
- grouped: one batch per adapter, one after the other (a batch of one adapter goes through PEFT's
  plain active-adapter path, as the service runs it);
- forced:  the grouped batches, but with per-row `adapter_names` all the same: what PEFT's mixed
  path costs on its own;
- base, no LoRA: the same rows on the model without GLMVISION_LORA, for reference.

It prints the median wall time of `--runs` runs (after a warm-up) and output tokens/s, side by side,
and mixed's speed over grouped's. The demo model is tiny, so this weighs per-call overhead (PEFT's
hooks, one more batch's Python) far more than matrix work; on a GPU with real weights a decode step
is memory-bound, so one mixed batch reads the base weights once where grouping reads them per group.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from glmvision.backends.local.adapters import Adapters
from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.demo import build_demo_model
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.backends.local.static import StaticEngine
from glmvision.core.backend import Admission
from glmvision.core.config import load_settings
from glmvision.core.generation import GenerationParams

ADMISSION = Admission(100_000, 3600, lambda: 0.0)


class Forced(Adapters):
    """Per-row adapter names on every call, even when the batch has one adapter."""

    def _choose(self, adapters: Sequence[str | None]) -> dict[str, Any]:
        return {"adapter_names": [adapter or "__base__" for adapter in adapters]}


def make_adapters(model_dir: Path, root: Path, count: int, rank: int) -> dict[str, str]:
    """`count` LoRA adapters with random (non-zero) weights on the language model, saved as PEFT does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from glmvision.backends.local.adapters import LANGUAGE_TARGETS, quiet_peft

    adapters = {}
    for number in range(count):
        torch.manual_seed(number)
        base = AutoModelForImageTextToText.from_pretrained(model_dir)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=LANGUAGE_TARGETS, init_lora_weights=False
        )
        with quiet_peft():
            peft_model = get_peft_model(base, config)
        name = f"a{number}"
        peft_model.save_pretrained(root / name)
        adapters[name] = str(root / name)
    return adapters


def requests_for(
    model: LoadedModel, rows: int, names: list[str | None], tokens: int
) -> list[tuple[Any, Any]]:
    """`rows` requests, each with its own image and prompt, the adapters taking turns."""
    made = []
    for row in range(rows):
        image = Image.new("RGB", (96 + 8 * row, 96), (40 * row % 256, 120, 200))
        content = [
            {"type": "image", "image": image},
            {"type": "text", "text": f"What does gauge {row} read?"},
        ]
        inputs = model.prepare([{"role": "user", "content": content}], enable_thinking=False)
        adapter = names[row % len(names)]
        made.append((inputs, GenerationParams(tokens, temperature=0, min_new_tokens=tokens, adapter=adapter)))
    return made


def continuous(model: LoadedModel, batch: list[tuple[Any, Any]]) -> None:
    engine = ContinuousEngine(model, load_settings({"GLMVISION_MAX_BATCH_SIZE": len(batch)}))
    engine._join([engine._job(inputs, params, ADMISSION.admit()) for inputs, params in batch])
    while engine._rows:
        engine._step()


def static(model: LoadedModel, batch: list[tuple[Any, Any]]) -> None:
    engine = StaticEngine(model, load_settings({"GLMVISION_MAX_BATCH_SIZE": len(batch)}))
    engine._run([engine._job(inputs, params, ADMISSION.admit()) for inputs, params in batch])


def groups(batch: list[tuple[Any, Any]]) -> list[list[tuple[Any, Any]]]:
    by: dict[str | None, list[tuple[Any, Any]]] = {}
    for one in batch:
        by.setdefault(one[1].adapter, []).append(one)
    return list(by.values())


def timed(function: Callable[[], None], runs: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="glmvision-lora-bench-"))
    model_dir = build_demo_model(root / "demo")
    adapters = make_adapters(model_dir, root, args.adapters, args.rank)
    lora = ",".join(f"{name}={path}" for name, path in adapters.items())
    common = {"GLMVISION_MODEL": str(model_dir), "GLMVISION_DEVICE": "cpu"}
    served = load_model(load_settings({**common, "GLMVISION_LORA": lora}))
    plain = load_model(load_settings(common))
    assert served.adapters is not None
    peft = served.adapters.peft
    # The same model called with per-row names whatever the batch: PEFT's mixed path alone.
    forced = dataclasses.replace(served, adapters=Forced(peft, list(adapters)))
    names: list[str | None] = list(adapters)
    batch = requests_for(served, args.rows, names, args.tokens)
    plain_batch = requests_for(plain, args.rows, [None], args.tokens)

    tokens = args.rows * args.tokens
    print(
        f"demo model, CPU, {args.rows} rows x {args.tokens} tokens, {args.adapters} adapters of rank "
        f"{args.rank}, median of {args.runs} runs"
    )
    columns = ("mixed", "grouped", "forced", "base, no LoRA")
    print(f"{'scheduler':<11} " + " ".join(f"{column:>16}" for column in columns) + "  mixed/grouped")
    for label, run in (("continuous", continuous), ("static", static)):
        mixed = timed(lambda run=run: run(served, batch), args.runs)
        grouped = timed(lambda run=run: [run(served, group) for group in groups(batch)], args.runs)
        by_force = timed(lambda run=run: [run(forced, group) for group in groups(batch)], args.runs)
        base = timed(lambda run=run: run(plain, plain_batch), args.runs)
        cells = [
            f"{seconds * 1000:7.0f} ms {tokens / seconds:4.0f}/s"
            for seconds in (mixed, grouped, by_force, base)
        ]
        print(
            f"{label:<11} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {cells[3]:>16}  {grouped / mixed:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
