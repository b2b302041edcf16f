#!/usr/bin/env python3
"""How long a newcomer's prefill holds up the rows already decoding (issue 8), on the demo model.

`.venv/bin/python bench/prefill.py` runs the continuous engine in this thread (no server): 4 rows
decoding, then newcomers with prompts of growing length (images included) join. It prints a decode
step's time beside the cycle time with each prefill: the stall every running row sees, and what
`GLMVISION_MAX_PREFILL_TOKENS` bounds. Medians of `--runs`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from glmvision.backend import Admission
from glmvision.config import load_settings
from glmvision.generation import GenerationParams
from glmvision.local.continuous import ContinuousEngine
from glmvision.local.demo import build_demo_model
from glmvision.local.loading import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--running", type=int, default=4, help="rows decoding when the newcomers join")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="glmvision-prefill-"))
    model = load_model(
        load_settings({"GLMVISION_MODEL": str(build_demo_model(directory)), "GLMVISION_DEVICE": "cpu"})
    )
    admission = Admission(100_000, 3600, lambda: 0.0)
    engine = ContinuousEngine(model, load_settings({"GLMVISION_MAX_BATCH_SIZE": 64}))
    long = GenerationParams(100_000, temperature=0, min_new_tokens=100_000)

    def prompt(words: int, images: int) -> object:
        content: list[dict[str, object]] = [
            {"type": "image", "image": Image.new("RGB", (448, 448), (i * 40, 90, 200))} for i in range(images)
        ]
        content.append({"type": "text", "text": "describe the picture " * words})
        return model.prepare([{"role": "user", "content": content}], enable_thinking=False)

    engine._join([engine._job(prompt(2, 1), long, admission.admit()) for _ in range(args.running)])
    for _ in range(5):
        engine._step()

    def timed(action: object) -> float:
        begin = time.perf_counter()
        action()  # type: ignore[operator]
        return (time.perf_counter() - begin) * 1000

    step = statistics.median(timed(engine._step) for _ in range(args.runs))
    print(f"{args.running} rows decoding: one step {step:.2f} ms (median of {args.runs})")
    print("| newcomers | prompt tokens each | prefill + step ms | stall x a step |")
    print("|---|---|---|---|")
    for count, words, images in [(1, 2, 1), (1, 200, 1), (1, 800, 4), (4, 200, 1), (8, 800, 4)]:
        inputs = prompt(words, images)
        tokens = int(inputs["input_ids"].shape[1])
        times = []
        for _ in range(args.runs):
            newcomers = [
                engine._job(inputs, GenerationParams(1, temperature=0), admission.admit())
                for _ in range(count)
            ]
            times.append(timed(lambda newcomers=newcomers: (engine._join(newcomers), engine._step())))
        cycle = statistics.median(times)
        print(f"| {count} | {tokens} | {cycle:.2f} | {cycle / step:.1f} |")
    for row in engine._rows:
        row.job.stream.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
