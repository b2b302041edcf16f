"""A tiny random-weight model with GLM-4.6V-Flash's architecture, processor and prompt format.

It lets the service, its tests and a demo run without the real 10 B checkpoint: the same
transformers classes, the same `AutoProcessor` / `AutoModelForImageTextToText` loading path, the
same chat template shape and control tokens, but a ~1 MB model whose answers are meaningless.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

DEMO_MARKER = "glmvision-demo.json"
DEMO_VERSION = 2  # 2: the chat template renders tools and tool calls

# Control tokens of the real GLM-4.6V vocabulary, in its order (there: ids 151329..151364). All are
# special here: `skip_special_tokens=True` also drops `<think>`, `</think>` and the box tokens, so
# decode with `skip_special_tokens=False` where they must be parsed.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
)
EOS_TOKEN = "<|endoftext|>"
STOP_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|user|>", "<|observation|>")

# Visual-token budget. The processor counts a still image twice (temporal patch 2) and one visual
# token covers 28x28 pixels, so an ordinary image gets at most MAX_PIXELS / (2 * 28 * 28) = 20
# tokens. Very elongated images get more (the short side never drops below 28 px), up to 63 at the
# processor's aspect-ratio limit of 200: every image stays within MAX_VISUAL_TOKENS.
MAX_VISUAL_TOKENS = 64
MAX_PIXELS = 2 * 28 * 28 * 20
MIN_PIXELS = 112 * 112

# `--full-image-budget`: GLM-4.6V-Flash's own image processor limits, 112x112 up to 6,144 visual
# tokens' worth of pixels (counted twice for the temporal patch), so a 2048x1536 photo is ~4,000
# visual tokens as with the real model. Videos get transformers' Glm46VVideoProcessor defaults.
FULL_MIN_PIXELS = 112 * 112
FULL_MAX_PIXELS = 28 * 28 * 2 * 6144  # 9,633,792
FULL_VIDEO_MAX_PIXELS = 28 * 28 * 2 * 30000

_TOKENIZER_VOCAB_SIZE = 512
_TRAINING_TEXT: tuple[str, ...] = (
    "Describe this image in one sentence.",
    "What is written on the sign? Answer briefly.",
    "How many people are in the picture, and what are they doing?",
    "The photo shows a red bicycle leaning against a white wall.",
    "A cat is sleeping on a blue sofa next to an open window.",
    "Please read the text in the document and summarise it.",
    "Where is the dog? Give the bounding box of the dog.",
    "You are a helpful assistant. Think step by step, then answer.",
    "Beschreibe das Bild. Décris l'image. 描述这张图片。",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" # % & @",
)

# Jinja chat template with the real template's prompt shape: `[gMASK]<sop>`, then
# `<|system|>\n...`, `<|user|>\n...` (one `<|begin_of_image|><|image|><|end_of_image|>` per image
# part), earlier assistant turns as `<|assistant|>\n<think>...</think>\n...` (their reasoning kept
# only after the last user turn), tool results as `<|observation|>\n<tool_response>...`, and the
# generation prompt `<|assistant|>\n`. With `enable_thinking=False` (thinking is on when it is left
# undefined) every user turn ends with `/nothink` and the generation prompt is pre-filled with an
# empty `<think></think>\n`. Tools passed via `tools=` open the prompt with GLM-4.5/4.6's system
# block (`# Tools`, one JSON line per tool in `<tools>`, the call format), and an assistant turn's
# `tool_calls` follow its text as `\n<tool_call>NAME\n` + `<arg_key>K</arg_key>\n<arg_value>V
# </arg_value>\n` per argument (V as JSON unless a string) + `</tool_call>`, as the real template
# writes them. Newlines are written as `{{ '\n' }}` only: all tags trim the whitespace around them.
CHAT_TEMPLATE = "".join(
    (
        "{%- macro render_content(content) -%}",
        "{%- if content is string -%}{{ content }}",
        "{%- elif content is iterable and content is not mapping -%}",
        "{%- for part in content -%}",
        "{%- if part is string -%}{{ part }}",
        "{%- elif part is mapping and part.type == 'text' -%}{{ part.text }}",
        "{%- elif part is mapping and (part.type == 'image' or 'image' in part) -%}",
        "<|begin_of_image|><|image|><|end_of_image|>",
        "{%- elif part is mapping and (part.type == 'video' or 'video' in part) -%}",
        "<|begin_of_video|><|video|><|end_of_video|>",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- elif content is not none -%}{{ content }}",
        "{%- endif -%}",
        "{%- endmacro -%}",
        "{%- set nothink = enable_thinking is defined and not enable_thinking -%}",
        "{%- set ns = namespace(last_user=-1) -%}",
        "{%- for m in messages -%}",
        "{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}",
        "{%- endfor -%}",
        "[gMASK]<sop>",
        "{%- if tools -%}",
        "<|system|>{{ '\\n' }}# Tools{{ '\\n\\n' }}",
        "You may call one or more functions to assist with the user query.{{ '\\n\\n' }}",
        "You are provided with function signatures within <tools></tools> XML tags:{{ '\\n' }}",
        "<tools>{{ '\\n' }}",
        "{%- for tool in tools -%}{{ tool | tojson(ensure_ascii=False) }}{{ '\\n' }}{%- endfor -%}",
        "</tools>{{ '\\n\\n' }}",
        "For each function call, output the function name and arguments within the following XML format:",
        "{{ '\\n' }}<tool_call>{function-name}{{ '\\n' }}",
        "<arg_key>{arg-key-1}</arg_key>{{ '\\n' }}<arg_value>{arg-value-1}</arg_value>{{ '\\n' }}",
        "<arg_key>{arg-key-2}</arg_key>{{ '\\n' }}<arg_value>{arg-value-2}</arg_value>{{ '\\n' }}",
        "...{{ '\\n' }}</tool_call>",
        "{%- endif -%}",
        "{%- for m in messages -%}",
        "{%- if m.role == 'system' -%}",
        "<|system|>{{ '\\n' }}{{ render_content(m.content) }}",
        "{%- elif m.role == 'user' -%}",
        "{%- set text = render_content(m.content) -%}",
        "<|user|>{{ '\\n' }}{{ text }}",
        "{%- if nothink and not text.endswith('/nothink') -%}/nothink{%- endif -%}",
        "{%- elif m.role == 'assistant' -%}",
        "{%- set text = render_content(m.content) -%}",
        "{%- set reasoning = '' -%}",
        "{%- if m.reasoning_content is string -%}",
        "{%- set reasoning = m.reasoning_content -%}",
        "{%- elif '</think>' in text -%}",
        "{%- set reasoning = text.split('</think>')[0].split('<think>')[-1] -%}",
        "{%- endif -%}",
        "{%- if '</think>' in text -%}{%- set text = text.split('</think>')[-1] -%}{%- endif -%}",
        "<|assistant|>{{ '\\n' }}<think>",
        "{%- if loop.index0 > ns.last_user and reasoning.strip() -%}",
        "{{ reasoning.strip() }}",
        "{%- endif -%}",
        "</think>",
        "{%- if text.strip() -%}{{ '\\n' }}{{ text.strip() }}{%- endif -%}",
        "{%- for call in m.tool_calls or [] -%}",
        "{%- set f = call.function if call.function is defined else call -%}",
        "{{ '\\n' }}<tool_call>{{ f.name }}{{ '\\n' }}",
        "{%- for k, v in f.arguments.items() -%}",
        "<arg_key>{{ k }}</arg_key>{{ '\\n' }}",
        "<arg_value>{{ v if v is string else v | tojson(ensure_ascii=False) }}</arg_value>{{ '\\n' }}",
        "{%- endfor -%}",
        "</tool_call>",
        "{%- endfor -%}",
        "{%- elif m.role == 'tool' or m.role == 'observation' -%}",
        "{%- if loop.first or messages[loop.index0 - 1].role != m.role -%}",
        "<|observation|>",
        "{%- endif -%}",
        "{{ '\\n' }}<tool_response>{{ '\\n' }}{{ render_content(m.content) }}",
        "{{ '\\n' }}</tool_response>",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "<|assistant|>{{ '\\n' }}",
        "{%- if nothink -%}<think></think>{{ '\\n' }}{%- endif -%}",
        "{%- endif -%}",
    )
)

# Sizes of the tiny model (the real one: text hidden 4096 x 40 layers, vision 1536 x 24 blocks).
_TEXT_HIDDEN = 64
_HEADS = 2
_ROPE_PARAMETERS: dict[str, Any] = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    # Must sum to head_dim * partial_rotary_factor / 2 = (64 / 2) * 0.5 / 2 = 8.
    "mrope_section": [2, 3, 3],
}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logging and progress bars for the duration of the block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _build_tokenizer() -> Any:
    """Train the tiny byte-level BPE tokenizer and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_TRAINING_TEXT) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=list(SPECIAL_TOKENS),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=65536,
        chat_template=CHAT_TEMPLATE,
    )


def _build_processor(tokenizer: Any, full_image_budget: bool = False) -> Any:
    """Wrap the tokenizer in a Glm46VProcessor with a small visual budget, or the real model's."""
    from transformers import Glm46VImageProcessor, Glm46VProcessor, Glm46VVideoProcessor

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    video_size, video_max = size, MAX_PIXELS
    if full_image_budget:
        size = {"shortest_edge": FULL_MIN_PIXELS, "longest_edge": FULL_MAX_PIXELS}
        video_size = {"shortest_edge": FULL_MIN_PIXELS, "longest_edge": FULL_VIDEO_MAX_PIXELS}
        video_max = FULL_VIDEO_MAX_PIXELS
    image_processor = Glm46VImageProcessor(size=size)
    video_processor = Glm46VVideoProcessor(
        size=video_size, max_image_size={"longest_edge": video_max}, num_frames=4, fps=1
    )
    return Glm46VProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _build_model(tokenizer: Any, seed: int) -> Any:
    """Create the tiny Glm4vForConditionalGeneration with seeded random weights."""
    import torch
    from transformers import GenerationConfig, Glm4vConfig, Glm4vForConditionalGeneration

    def token_id(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    eos_id = token_id(EOS_TOKEN)
    config = Glm4vConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 2 * _TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": _HEADS,
            "num_key_value_heads": 1,
            "max_position_embeddings": 65536,
            "rope_parameters": dict(_ROPE_PARAMETERS),
            "pad_token_id": eos_id,
            "eos_token_id": [token_id(t) for t in STOP_TOKENS],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "out_hidden_size": _TEXT_HIDDEN,
            "image_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=token_id("<|image|>"),
        video_token_id=token_id("<|video|>"),
        image_start_token_id=token_id("<|begin_of_image|>"),
        image_end_token_id=token_id("<|end_of_image|>"),
        video_start_token_id=token_id("<|begin_of_video|>"),
        video_end_token_id=token_id("<|end_of_video|>"),
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Glm4vForConditionalGeneration(config)
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[token_id(t) for t in STOP_TOKENS],
        pad_token_id=eos_id,
        do_sample=False,
        max_new_tokens=64,
    )
    return model


def build_demo_model(
    directory: str | os.PathLike[str], *, seed: int = 0, full_image_budget: bool = False
) -> pathlib.Path:
    """Write a tiny random-weight GLM-4.6V-Flash-architecture model + processor to directory."""
    target = pathlib.Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        tokenizer = _build_tokenizer()
        processor = _build_processor(tokenizer, full_image_budget)
        model = _build_model(tokenizer, seed)
        model.save_pretrained(target)
        processor.save_pretrained(target)
    marker = {
        "demo": True,
        "version": DEMO_VERSION,
        "seed": seed,
        "note": "random weights: answers are meaningless",
    }
    if full_image_budget:
        marker["full_image_budget"] = True
    # Written last: a directory holding the marker is complete.
    (target / DEMO_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return target


def ensure_demo_model(cache_dir: str | os.PathLike[str]) -> pathlib.Path:
    """Return the demo model dir in cache_dir, building it once, atomically and race-safely."""
    cache = pathlib.Path(cache_dir)
    target = cache / f"demo-v{DEMO_VERSION}"
    if (target / DEMO_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=cache))
    try:
        build_demo_model(staging)
        # mkdtemp makes the directory private; the cache may be shared with the service's user.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if target.exists() and not (target / DEMO_MARKER).is_file():
            # Only complete builds are ever renamed into place, so this is a stray directory.
            _discard(target, cache)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / DEMO_MARKER).is_file():
                raise
            # Another process finished first: its build is identical, use it.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _discard(path: pathlib.Path, cache: pathlib.Path) -> None:
    """Move path out of the way and delete it, tolerating a concurrent process doing the same."""
    trash = cache / f".{path.name}.discard-{uuid.uuid4().hex}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
