#!/usr/bin/env python3
"""Model-only timing: the benchmark's request through model.generate() directly, with no HTTP.

Run by bench/run.py in a subprocess after the servers are stopped; prints one `RESULT {json}` line.
`.venv/bin/python bench/model_time.py --model DIR --image IMAGE.jpg [--batch 8] [--runs 7]`
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _median_ms(function: Callable[[], Any], warmup: int, runs: int) -> tuple[float, list[float], Any]:
    """Call function warmup + runs times; the median and all timed runs in ms, and the last result."""
    result: Any = None
    for _ in range(warmup):
        result = function()
    times: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times), times, result


def main(argv: list[str] | None = None) -> int:
    """Time preprocessing and generate() for one request alone and for a left-padded batch."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default="Describe this image in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    import transformers
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    transformers.utils.logging.disable_progress_bar()
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(args.model)
    model.eval()
    encoded = base64.b64encode(Path(args.image).read_bytes())

    def conversation() -> list[dict[str, Any]]:
        image = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
        content = [{"type": "image", "image": image}, {"type": "text", "text": args.prompt}]
        return [{"role": "user", "content": content}]

    def prepare_one() -> Any:
        return processor.apply_chat_template(
            conversation(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )

    def prepare_batch() -> Any:
        return processor.apply_chat_template(
            [conversation() for _ in range(args.batch)],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        )

    one = prepare_one()
    batch = prepare_batch()

    def generate(inputs: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)

        return call

    prep_one_ms, _, _ = _median_ms(prepare_one, args.warmup, args.runs)
    prep_batch_ms, _, _ = _median_ms(prepare_batch, args.warmup, args.runs)
    gen_one_ms, gen_one_all, out_one = _median_ms(generate(one), args.warmup, args.runs)
    gen_batch_ms, gen_batch_all, out_batch = _median_ms(generate(batch), args.warmup, args.runs)
    result = {
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": int(one["input_ids"].shape[1]),
        "batch_prompt_tokens": int(batch["input_ids"].shape[1]),
        "new_tokens_single": int(out_one.shape[1] - one["input_ids"].shape[1]),
        "new_tokens_batch": int(out_batch.shape[1] - batch["input_ids"].shape[1]),
        "batch": args.batch,
        "runs": args.runs,
        "prepare_one_ms": prep_one_ms,
        "prepare_batch_ms": prep_batch_ms,
        "generate_one_ms": gen_one_ms,
        "generate_one_runs_ms": gen_one_all,
        "generate_batch_ms": gen_batch_ms,
        "generate_batch_runs_ms": gen_batch_all,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
