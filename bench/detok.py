#!/usr/bin/env python3
"""Per-token cost of turning generated ids into answer deltas: full re-decode vs incremental.

"old" re-decodes all ids and re-renders all text per token, as GenerationStream did before
issue 7; "new" decodes a window of ids and renders only new text.

Feeds 2048 tokens of the demo tokenizer one at a time through a GenerationStream (thinking on and
off, with and without stop strings) and prints the mean cost per token at three positions.
`.venv/bin/python bench/detok.py [--runs 3]`
"""

from __future__ import annotations

import argparse
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

from glmvision.backends.local.demo import build_demo_model
from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.config import load_settings
from glmvision.core.generation import GenerationParams
from glmvision.postprocess.output import MARKERS, render
from glmvision.postprocess.stream import Decoder, GenerationStream

TOKENS = 2048
RANGES = ((1, 256), (768, 1024), (1792, 2048))
ANSWER = (
    "The photo shows a red bicycle leaning against a white wall. 描述这张图片。 😀 "
    "<|begin_of_box|>[[12,34,560,780]]<|end_of_box|> Décris l'image, 0123456789. "
)


class OldDecoder:
    """The decode every token used to run: all ids, then every control token replaced away."""

    def __init__(self, model: LoadedModel) -> None:
        self.stop_ids = model.stop_ids
        self._tokenizer = model.processor.tokenizer
        self._noise = [t for t in self._tokenizer.all_special_tokens if t and t not in MARKERS]

    def decode(self, token_ids: list[int]) -> str:
        text = self._tokenizer.decode(token_ids, skip_special_tokens=False)
        for token in self._noise:
            text = text.replace(token, "")
        return text


class FullRedecode:
    """The old detokenizing: decode all ids so far on every push."""

    def __init__(self, decoder: Decoder) -> None:
        self._decode = decoder.decode
        self._ids: list[int] = []
        self._sent = 0

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new, self._sent = text[self._sent :], len(text)
        return new

    def flush(self) -> str:
        return self._decode(self._ids)[self._sent :]


class OldStream(GenerationStream):
    """The old stream: all ids re-decoded and all text re-rendered on every token."""

    detokenizer = FullRedecode

    def _take_text(self, piece: str) -> tuple[str, str]:
        self._text += piece
        params = self._params
        rendered = render(self._text, params.enable_thinking, params.stop, final=False)
        self._renderer.stopped = rendered.stopped
        sent_reasoning, sent_answer = getattr(self, "_old_sent", ("", ""))
        self._old_sent = (rendered.reasoning, rendered.answer)
        return rendered.reasoning[len(sent_reasoning) :], rendered.answer[len(sent_answer) :]


def token_ids(model: LoadedModel, thinking: bool) -> list[int]:
    """2048 ids of plausible output: reasoning first when thinking, then a long answer."""
    tokenizer = model.processor.tokenizer
    text = ""
    if thinking:  # half of it reasoning, so both phases run long
        while len(tokenizer.encode(text, add_special_tokens=False)) < TOKENS // 2:
            text += "Look at the image first. 先看图片。 "
        text = f"<think>{text}</think>"
    while len(ids := tokenizer.encode(text, add_special_tokens=False)) < TOKENS:
        text += ANSWER
    return ids[:TOKENS]


def per_token_us(
    stream_class: type[GenerationStream], decoder: Decoder, ids: list[int], params: GenerationParams
) -> list[float]:
    """What the request thread spends on each token, in microseconds."""
    stream = stream_class(decoder, 10, params)
    times = []
    clock = time.perf_counter
    for token_id in ids:
        started = clock()
        stream._feed([token_id])  # the per-token work of GenerationStream._deltas
        times.append((clock() - started) * 1e6)
    return times


def main(argv: list[str] | None = None) -> int:
    """Print old vs new per-token cost at three positions for four stream settings."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs per setting; the median per token is kept")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_demo_model(tmp)
        model = load_model(load_settings({"GLMVISION_MODEL": str(model_dir), "GLMVISION_DEVICE": "cpu"}))
    old, new = OldDecoder(model), model
    print(f"per-token cost in microseconds (mean over the positions, median of {args.runs} runs)")
    print(f"{'setting':<26}{'positions':>11}{'old':>10}{'new':>10}{'old/new':>9}")
    for thinking in (False, True):
        ids = token_ids(model, thinking)
        for stops in ((), ("NEVER SEEN", "。。")):
            params = GenerationParams(max_new_tokens=TOKENS, enable_thinking=thinking, stop=stops)
            costs = {}
            for name, stream_class, decoder in (("old", OldStream, old), ("new", GenerationStream, new)):
                runs = [per_token_us(stream_class, decoder, ids, params) for _ in range(args.runs)]
                costs[name] = [statistics.median(values) for values in zip(*runs, strict=True)]
            label = f"thinking {'on' if thinking else 'off'}, {'stops' if stops else 'no stops'}"
            for first, last in RANGES:
                o, n = (statistics.fmean(costs[k][first - 1 : last]) for k in ("old", "new"))
                print(f"{label:<26}{f'{first}-{last}':>11}{o:>10.1f}{n:>10.1f}{o / n:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
