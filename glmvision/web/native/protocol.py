"""The native endpoints' request bodies: /v1/chat/vision and /v1/chat, and their sampling parameters."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import InitErrorDetails

from glmvision.core.config import Settings
from glmvision.core.constraints import check_prompt_length, generation_params, json_constraint
from glmvision.core.errors import bad_request
from glmvision.core.generation import MAX_TOP_LOGPROBS, GenerationParams
from glmvision.core.images import Detail, PixelBudget
from glmvision.web.protocol import SamplingFields, rule_error


class NativeRequest(SamplingFields):
    """What both native bodies share beyond sampling: a prompt about one image, and one conversion."""

    if TYPE_CHECKING:
        # Each endpoint's model declares it after its image fields, so that its errors keep their order.
        prompt: str

    logprobs: bool = False  # the answer's tokens with their log-probabilities, as OpenAI's
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_given(cls, prompt: str) -> str:
        if not prompt.strip():
            raise rule_error("invalid_value", "Field 'prompt' must not be empty.")
        return prompt

    def to_generation_params(self, settings: Settings, adapter: str | None = None) -> GenerationParams:
        """How to sample, under the server's limits: the token cap, the schema's, the prompt's size;
        `adapter`: the loaded LoRA adapter the body names (the view resolves it)."""
        schema = self.json_schema  # {} means any JSON
        constraint = None if schema is None else json_constraint(schema, settings, "json_schema")
        params = generation_params(
            settings,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            enable_thinking=self.enable_thinking,
            constraint=constraint,
            adapter=adapter,
        )
        check_prompt_length(len(self.prompt), settings, "prompt")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("invalid_value", "'top_logprobs' needs 'logprobs': true.", "top_logprobs")
        if self.logprobs:
            params = replace(params, logprobs=self.top_logprobs or 0)
        return params


class VisionRequest(NativeRequest):
    """Body of POST /v1/chat/vision: `image` (base64/data URL), `image_url` or `video` (base64/data URL),
    and a prompt; `detail`, `min_pixels` and `max_pixels` (width x height) set the size the model sees
    the image at."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["image"]}, {"required": ["image_url"]}, {"required": ["video"]}]
        }
    )

    image: str | None = Field(default=None, min_length=1)
    image_url: str | None = Field(default=None, min_length=1)
    video: str | None = Field(default=None, min_length=1)
    detail: Detail | None = None
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    prompt: str

    @field_validator("max_pixels")
    @classmethod
    def _pixels_in_order(cls, max_pixels: int | None, info: ValidationInfo) -> int | None:
        min_pixels = info.data.get("min_pixels")
        if max_pixels is not None and min_pixels is not None and min_pixels > max_pixels:
            message = f"Field 'max_pixels' ({max_pixels:,}) is less than 'min_pixels' ({min_pixels:,})."
            raise rule_error("invalid_value", message)
        return max_pixels

    @classmethod
    def body_rules(cls, data: dict[str, Any]) -> list[InitErrorDetails]:
        """Exactly one of `image`, `image_url` and `video` (null counts as absent)."""
        if data.get("video") is not None:
            others = [name for name in ("image", "image_url") if data.get(name) is not None]
            if others:
                error = rule_error("invalid_value", f"Send either {others[0]!r} or 'video', not both.")
                return [{"type": error, "loc": ("video",), "input": None}]
            return []
        has_image, has_url = data.get("image") is not None, data.get("image_url") is not None
        if has_image and has_url:
            error = rule_error("invalid_value", "Send either 'image' or 'image_url', not both.")
            return [{"type": error, "loc": ("image_url",), "input": data["image_url"]}]
        if not has_image and not has_url:
            error = rule_error(
                "missing_field", "Field 'image' is required: base64 image bytes, or a URL in 'image_url'."
            )
            return [{"type": error, "loc": ("image",), "input": None}]
        return []

    @property
    def image_source(self) -> tuple[str, str]:
        """The image as sent, and the field that holds it."""
        if self.image is not None:
            return self.image, "image"
        assert self.image_url is not None  # the body rules ask for one
        return self.image_url, "image_url"

    @property
    def pixel_budget(self) -> PixelBudget | None:
        """The size asked for the image (None: the server's default); errors name the body's fields."""
        if self.detail is None and self.min_pixels is None and self.max_pixels is None:
            return None
        return PixelBudget(self.detail, self.min_pixels, self.max_pixels, "")


class SeedChatRequest(NativeRequest):
    """Body of POST /v1/chat: `image_url` (http(s) URL, base64 or data URL) and a prompt."""

    image_url: str = Field(min_length=1)
    prompt: str
