"""Generated ids to text: incremental decoding equals one-shot decoding, also under many threads."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from glmvision.backends.local.loading import load_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.config import load_settings
from glmvision.core.generation import GenerationParams
from glmvision.postprocess.output import MARKERS, render
from glmvision.postprocess.stream import GenerationStream, IncrementalDecoder
from glmvision.postprocess.tools import TOOL_TAGS

TEXTS = [
    "The photo shows a red bicycle.",
    "描述这张图片。",
    "😀🚲 ok",
    "Décris l'image",
    "STOP here",
    " <think> spelled out ",
    "\n\n  ",
]


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> LoadedModel:
    return load_model(load_settings({"GLMVISION_MODEL": str(demo_model_dir), "GLMVISION_DEVICE": "cpu"}))


def random_ids(model: LoadedModel, rng: random.Random) -> list[int]:
    """Output-like ids: encoded text, single byte pieces (parts of characters), control tokens."""
    tokenizer = model.processor.tokenizer
    specials = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
    ids: list[int] = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.35:
            ids += tokenizer.encode(rng.choice(TEXTS), add_special_tokens=False)
        elif kind < 0.6:
            ids.append(rng.randrange(256))  # the byte alphabet: lone bytes of multi-byte characters
        elif kind < 0.8:
            ids.append(rng.randrange(len(tokenizer)))
        else:
            ids.append(rng.choice(specials))
    return ids


def old_decode(model: LoadedModel, ids: list[int]) -> str:
    """How generated ids were decoded before: all at once, control tokens (not markers or tool-call
    tags) replaced away."""
    tokenizer = model.processor.tokenizer
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for token in tokenizer.all_special_tokens:
        if token not in MARKERS and token not in TOOL_TAGS:
            text = text.replace(token, "")
    return text


def decode_in_pieces(model: LoadedModel, ids: list[int], rng: random.Random) -> str:
    detokenizer = IncrementalDecoder(model)
    text = ""
    at = 0
    while at < len(ids):
        size = rng.choice([1, 1, 1, 2, 3])
        text += detokenizer.push(ids[at : at + size])
        at += size
        assert "\ufffd" not in text[-1:], "an undecided character was let through"
    return text + detokenizer.flush()


def test_the_demo_vocabulary_has_what_the_property_needs(model: LoadedModel) -> None:
    tokenizer = model.processor.tokenizer
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("描😀", add_special_tokens=False))
    assert len(pieces) > 2  # multi-byte characters span several tokens
    assert all(tokenizer.convert_tokens_to_ids(marker) != tokenizer.unk_token_id for marker in MARKERS)


def test_incremental_decoding_equals_one_shot_decoding(model: LoadedModel) -> None:
    rng = random.Random(47085)
    for _ in range(2000):
        ids = random_ids(model, rng)
        whole = model.decode(ids)
        assert decode_in_pieces(model, ids, rng) == whole, ids
        # Control tokens go exactly as they went when every token re-decoded everything.
        assert whole == old_decode(model, ids), ids


def test_an_incomplete_character_waits_for_its_bytes(model: LoadedModel) -> None:
    ids = model.processor.tokenizer.encode("😀", add_special_tokens=False)
    detokenizer = IncrementalDecoder(model)
    assert [detokenizer.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    assert detokenizer.flush() == ""
    # Bytes that never complete a character are given as they decode, at the end.
    detokenizer = IncrementalDecoder(model)
    assert detokenizer.push(ids[:1]) == ""
    assert detokenizer.flush() == "\ufffd"


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("stops", [(), ("STOP",), (" ", "。")])
def test_streamed_deltas_add_up_to_the_one_shot_answer(
    model: LoadedModel, thinking: bool, stops: tuple[str, ...]
) -> None:
    """Through a stream, token by token or in groups: the deltas are the whole answer, as before."""
    rng = random.Random(hash((thinking, stops)) & 0xFFFF)
    think = model.processor.tokenizer.encode("<think>", add_special_tokens=False)
    for _ in range(300):
        ids = (think if rng.random() < 0.5 else []) + random_ids(model, rng)
        stream = GenerationStream(
            model, 5, GenerationParams(max_new_tokens=1000, enable_thinking=thinking, stop=stops)
        )
        at = 0
        while at < len(ids):
            size = rng.choice([1, 1, 2, 4])
            stream.put(ids[at : at + size])
            at += size
        stream.end()
        deltas = list(stream)
        result = stream.result
        assert result is not None
        assert "".join(d.content for d in deltas) == result.text
        assert "".join(d.reasoning for d in deltas) == (result.reasoning or "")
        used = stream.token_ids  # up to a stop token or stop string
        if used and used[-1] in model.stop_ids:
            used = used[:-1]
        expected = render(old_decode(model, used), thinking, stops)
        assert (result.text, result.reasoning or "") == (expected.answer, expected.reasoning), ids


def test_prepare_and_decode_agree_across_many_threads(model: LoadedModel) -> None:
    """16 threads at once: prepare, decode, incremental decode, and encodes with varying padding."""
    image = Image.new("RGB", (64, 48), (200, 30, 60))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "描述 😀"}]}
    ]
    expected_inputs = model.prepare(messages, enable_thinking=False)
    ids = model.processor.tokenizer.encode(
        "A cat on a sofa. 描述这张图片。😀 " * 40, add_special_tokens=False
    )
    expected_text = model.decode(ids)
    long_text = "A cat is sleeping on a blue sofa next to an open window. " * 300
    failures: list[Any] = []
    start = threading.Barrier(16)

    def work(worker: int) -> None:
        start.wait()
        rng = random.Random(worker)
        for call in range(50):
            try:
                task = (worker + call) % 4
                if task == 0:
                    inputs = model.prepare(messages, enable_thinking=False)
                    same = inputs.keys() == expected_inputs.keys() and all(
                        torch.equal(inputs[k], expected_inputs[k]) for k in inputs
                    )
                    if not same:
                        failures.append(("prepare", worker, call))
                elif task == 1:
                    if model.decode(ids) != expected_text:
                        failures.append(("decode", worker, call))
                elif task == 2:
                    if decode_in_pieces(model, ids, rng) != expected_text:
                        failures.append(("incremental", worker, call))
                else:
                    # Each encode sets padding/truncation on its tokenizer first: a shared one
                    # would hand these settings to whoever encodes at the same moment.
                    length = 1000 + 8 * (call % 5)
                    with model.processors.checkout() as processor:
                        out = processor.tokenizer(
                            [long_text], padding="max_length", truncation=True, max_length=length
                        )
                    if len(out["input_ids"][0]) != length:
                        failures.append(("padding", worker, call))
            except Exception as exc:  # noqa: BLE001 - every error is a failure to report
                failures.append((repr(exc), worker, call))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
