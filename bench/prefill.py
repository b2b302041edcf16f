#!/usr/bin/env python3
"""How long a newcomer's prefill holds up the rows already decoding (issue 8), on the demo model.

`.venv/bin/python bench/prefill.py` runs the continuous engine in this thread (no server): 4 rows
decoding, then newcomers with prompts of growing length (images included) join through the
engine's own cycles. For each prefill budget (`GLMVISION_MAX_PREFILL_TOKENS`) it prints how many
cycles they took to join and the longest cycle meanwhile: the stall every running row sees, as a
multiple of a plain decode step. Medians of `--runs`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.demo import build_demo_model
from glmvision.backends.local.loading import load_model
from glmvision.core.backend import Admission
from glmvision.core.config import load_settings
from glmvision.core.generation import GenerationParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--running", type=int, default=4, help="rows decoding when the newcomers join")
    parser.add_argument("--budgets", type=lambda v: [int(x) for x in v.split(",")], default=[8192, 1024])
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="glmvision-prefill-"))
    model = load_model(
        load_settings({"GLMVISION_MODEL": str(build_demo_model(directory)), "GLMVISION_DEVICE": "cpu"})
    )
    admission = Admission(100_000, 3600, lambda: 0.0)
    # A KV budget no newcomer here exceeds, so each joins beside the decoding rows, never after them.
    settings = load_settings(
        {"GLMVISION_MAX_BATCH_SIZE": 64, "GLMVISION_BATCH_WAIT_MS": 0, "GLMVISION_MAX_BATCH_TOKENS": 1 << 22}
    )
    long = GenerationParams(5000, temperature=0, min_new_tokens=5000)  # still running at the end

    def prompt(words: int, images: int) -> object:
        content: list[dict[str, object]] = [
            {"type": "image", "image": Image.new("RGB", (448, 448), (i * 40, 90, 200))} for i in range(images)
        ]
        content.append({"type": "text", "text": "describe the picture " * words})
        return model.prepare([{"role": "user", "content": content}], enable_thinking=False)

    def timed(action: Callable[[], object]) -> float:
        begin = time.perf_counter()
        action()
        return (time.perf_counter() - begin) * 1000

    print(
        "| newcomers | prompt tokens each | prefill budget | cycles to join | longest cycle ms | x a step |"
    )
    print("|---|---|---|---|---|---|")
    for count, words, images in [(1, 2, 1), (1, 200, 1), (4, 200, 1), (1, 800, 4), (2, 800, 4)]:
        inputs = prompt(words, images)
        tokens = int(inputs["input_ids"].shape[1])
        for budget in args.budgets:
            engine = ContinuousEngine(model, settings.model_copy(update={"max_prefill_tokens": budget}))
            engine._join([engine._job(prompt(2, 1), long, admission.admit()) for _ in range(args.running)])
            step = statistics.median(timed(engine._step) for _ in range(args.runs))
            cycles, longest = [], []
            for _ in range(args.runs):
                newcomers = [
                    engine._job(inputs, GenerationParams(1, temperature=0), admission.admit())
                    for _ in range(count)
                ]
                engine._queue.extend(newcomers)
                times = []
                while engine._queue or engine._chunked is not None:
                    times.append(timed(engine._cycle))
                cycles.append(len(times))
                longest.append(max(times))
            worst = statistics.median(longest)
            print(
                f"| {count} | {tokens} | {budget} | {statistics.median(cycles):.0f} | {worst:.1f} "
                f"| {worst / step:.1f} |"
            )
            assert len(engine._rows) == args.running, "the decoding rows ended before the measurement"
            for row in engine._rows:
                row.job.stream.close()
            engine._leave_if_done(check_clients=True)
    print(f"(one decode step of {args.running} rows alone: {step:.2f} ms; medians of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
