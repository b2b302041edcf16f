#!/usr/bin/env python3
"""What structured outputs cost: compiling a schema (first time vs cached), and decoding under a mask.

Compiles the test schemas on the demo tokenizer, then runs the continuous scheduler on the demo
model (CPU) with 8 rows per batch: all free, half constrained, all constrained; and prints the
cost per generated token side by side. Free rows have min_tokens set so that every row runs its
whole budget; constrained rows end when their document does, so the figure is per token.
`.venv/bin/python bench/grammar.py [--rounds 5] [--tokens 96 384]`
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# This checkout's glmvision, whichever one the venv may have installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_structured import SCHEMAS

from glmvision.backends.local.continuous import ContinuousEngine
from glmvision.backends.local.demo import build_demo_model
from glmvision.backends.local.grammar import GrammarBook
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.backend import Admission
from glmvision.core.config import load_settings
from glmvision.core.generation import Constraint, GenerationParams

ROWS = 8


def compile_costs(model: LoadedModel) -> None:
    """Milliseconds to compile each schema (in a warm compiler process, round trip included), and to
    find it compiled again."""
    print("compile (demo tokenizer, 512 tokens)        first ms   cached ms")
    book = GrammarBook(model.processor.tokenizer, 512, model.stop_ids)
    book.compile(Constraint('{"type": "integer"}'))  # its compiler process started: not a schema's cost
    for name, schema in SCHEMAS.items():
        constraint = Constraint(json.dumps(schema))
        started = time.perf_counter()
        book.compile(constraint)
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(100):
            book.compile(constraint)
        cached = (time.perf_counter() - started) / 100
        print(f"  {name:40s} {first * 1000:9.2f} {cached * 1000:11.4f}")


def decode_ms_per_token(model: LoadedModel, constrained: int, tokens: int) -> float:
    """Wall time per generated token of one batch of ROWS rows, `constrained` of them under grammars."""
    engine = ContinuousEngine(model, load_settings({"GLMVISION_MAX_BATCH_SIZE": str(ROWS)}))
    admission = Admission(10_000, 600, lambda: 0.0)
    schemas = list(SCHEMAS.values())
    jobs = []
    for row in range(ROWS):
        prompt = f"question {row}: read the form in this picture, please"
        inputs = model.prepare([{"role": "user", "content": [{"type": "text", "text": prompt}]}], False)
        grammar = None
        if row < constrained:
            grammar = model.grammars().compile(Constraint(json.dumps(schemas[row % len(schemas)])))
            params = GenerationParams(max_new_tokens=tokens, temperature=0)
        else:
            params = GenerationParams(max_new_tokens=tokens, temperature=0, min_new_tokens=tokens)
        job = engine._job(inputs, params, admission.admit())
        job.constraint = grammar
        jobs.append(job)
    started = time.perf_counter()
    engine._join(jobs)
    while engine._rows:
        engine._step()
    elapsed = time.perf_counter() - started
    return elapsed * 1000 / sum(job.generated for job in jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, nargs="+", default=[96, 384])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        directory = build_demo_model(Path(workdir) / "demo")
        model = load_model(load_settings({"GLMVISION_MODEL": str(directory), "GLMVISION_DEVICE": "cpu"}))
        compile_costs(model)
        decode_ms_per_token(model, ROWS, 8)  # warm: the first model calls are slower
        for tokens in args.tokens:
            print(f"\ndecode, {ROWS} rows a batch, {tokens} tokens a row, median of {args.rounds}")
            free = None
            for constrained in (0, ROWS // 2, ROWS):
                runs = [decode_ms_per_token(model, constrained, tokens) for _ in range(args.rounds)]
                median = statistics.median(runs)
                free = free or median
                ratio = median / free
                line = f"  {constrained} of {ROWS} rows constrained: {median:6.3f} ms/token ({ratio:.2f}x)"
                if constrained:  # what a constrained token adds, whatever the model's own cost
                    added = (median - free) * ROWS / constrained * 1000
                    line += f", +{added:.0f} us per constrained token"
                print(line)


if __name__ == "__main__":
    main()
