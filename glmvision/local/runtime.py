"""A loaded processor + model pair: turns chat messages into inputs and generated ids into text."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import bad_request
from ..output import MARKERS

log = logging.getLogger("glmvision")

_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


@dataclass
class LoadedModel:
    """A processor + model pair on one device, safe to share between a worker's threads."""

    processor: Any
    model: Any
    model_id: str
    device: str
    dtype: str
    demo: bool
    load_seconds: float

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        for token in _STOP_TOKENS:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
                ids.append(token_id)
        self.stop_ids: list[int] = ids
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
        # Control tokens to drop from answers; the think/box markers are handled by glmvision.output.
        self._noise = [t for t in tokenizer.all_special_tokens if t and t not in MARKERS]

    def info(self) -> dict[str, Any]:
        """Describe the loaded model for /v1/models."""
        return {"id": self.model_id, "demo": self.demo, "device": self.device, "dtype": self.dtype}

    def prepare(self, messages: list[dict[str, Any]], enable_thinking: bool, param: str = "image") -> Any:
        """Build model inputs from chat messages holding PIL images (runs outside the generation lock)."""
        try:
            return self.processor.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                sanitize_control_tokens=True,
                enable_thinking=enable_thinking,
            )
        except ValueError:
            # The processor validates images (e.g. aspect ratio); that is the client's input.
            log.info("processor refused an image", exc_info=log.isEnabledFor(logging.DEBUG))
            raise bad_request("image_rejected", "The model's processor refused an image.", param) from None

    def image_sizes(self, inputs: Any) -> list[tuple[int, int]]:
        """The (width, height) of each image as the processor handed it to the model."""
        grids = inputs.get("image_grid_thw")
        patch = self.processor.image_processor.patch_size
        return [] if grids is None else [(int(w) * patch, int(h) * patch) for _, h, w in grids.tolist()]

    def fit_image(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) this model's image processor resizes an image of that size to."""
        processor = self.processor.image_processor
        smart_resize = getattr(sys.modules[type(processor).__module__], "smart_resize", None)
        if smart_resize is None:
            return width, height

        def resize(w: int, h: int) -> tuple[int, int]:
            new_height, new_width = smart_resize(
                num_frames=processor.temporal_patch_size,
                height=h,
                width=w,
                temporal_factor=processor.temporal_patch_size,
                factor=processor.patch_size * processor.merge_size,
                min_pixels=processor.size["shortest_edge"],
                max_pixels=processor.size["longest_edge"],
            )
            return int(new_width), int(new_height)

        try:
            fitted = resize(width, height)
            # Very thin images hit the minimum side and would shrink again: leave those to the processor.
            return fitted if resize(*fitted) == fitted else (width, height)
        except (ValueError, KeyError, TypeError, AttributeError):
            return width, height  # the processor will speak for itself

    def decode(self, token_ids: list[int]) -> str:
        """Decode generated ids to text, dropping control tokens but keeping think/box markers."""
        text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=False)
        for token in self._noise:
            text = text.replace(token, "")
        return text
