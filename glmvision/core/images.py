"""Turn a client's base64 image into a safe, bounded RGB PIL image."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Literal, Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from glmvision.core.errors import APIError, bad_request

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# The GLM-V image processor refuses images whose sides differ by more than this factor.
MAX_ASPECT_RATIO = 200

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image ready for the processor, with the sizes the client should hear about."""

    image: Image.Image | None  # None: known from the response cache by its bytes, never decoded
    width: int  # as a person sees it (after EXIF orientation)
    height: int
    resized_to: tuple[int, int]  # the size handed to the model's processor
    # The client's own bytes and their MIME type when decoding changed nothing (an RGB image, upright,
    # not resized): an upstream engine can be sent those instead of a re-encoding.
    original: bytes | None = None
    mime: str | None = None
    budget: PixelBudget | None = None  # the request's own bounds for it, when it asked for any


Detail = Literal["auto", "low", "high"]
# OpenAI's detail "low": at most 256 visual tokens (one per 28x28 pixels), about 448x448.
LOW_DETAIL_PIXELS = 256 * 28 * 28


@dataclass(frozen=True)
class PixelBudget:
    """What a request asks of one image's size: OpenAI's `detail`, and explicit bounds in pixels (w x h).

    Explicit bounds win over `detail`; `param` names the image's object, whose fields errors name.
    """

    detail: Detail | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    param: str = ""  # "": the body's own fields

    @property
    def is_default(self) -> bool:
        """Whether it asks for nothing but the server's own rule."""
        return self.detail in (None, "auto") and self.min_pixels is None and self.max_pixels is None

    def key(self) -> str | None:
        """What the response cache tells budgets apart by (None: the server's default)."""
        return None if self.is_default else f"{self.detail or 'auto'}:{self.min_pixels}:{self.max_pixels}"

    def field(self, name: str) -> str:
        """The path of one of its fields in the request."""
        return f"{self.param}.{name}" if self.param else name

    def bounds(self, least: int, most: int) -> tuple[int, int]:
        """(min, max) pixels for the image within the server's [least, most]; a 400 naming the
        field when an explicit bound lies outside them."""
        for name, value in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)):
            if value is not None and not least <= value <= most:
                limits = f"this server takes {least:,} to {most:,} pixels (width x height)"
                raise bad_request("invalid_value", f"'{name}' is {value:,}; {limits}.", self.field(name))
        low = least if self.min_pixels is None else self.min_pixels
        high = most
        if self.max_pixels is not None:
            high = self.max_pixels
        elif self.detail == "low":  # an explicit min_pixels over low detail's cap wins
            high = max(min(LOW_DETAIL_PIXELS, most), low)
        if low > high:
            message = f"'min_pixels' ({low:,}) is more than 'max_pixels' ({high:,})."
            raise bad_request("invalid_value", message, self.field("max_pixels"))
        return low, high


class Fit(Protocol):
    """Maps a (width, height) to the size the model's processor would scale it to; with a budget,
    to the size within the budget's bounds that the processor then takes as it is."""

    def __call__(self, width: int, height: int, budget: PixelBudget | None = None, /) -> tuple[int, int]: ...


def decode_base64(data: str, param: str = "image") -> bytes:
    """Decode strict base64, optionally wrapped in a `data:image/...;base64,` URL."""
    match = _DATA_URL.match(data)
    if match:
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise bad_request("unsupported_image_format", f"Data URL type {mime!r} is not an image.", param)
        data = data[match.end() :]
    elif data.startswith("data:"):
        raise bad_request("invalid_base64", "Data URLs must be base64 encoded (';base64,').", param)
    try:
        if data:
            return base64.b64decode(data, validate=True)  # the common case, at C speed
    except (binascii.Error, ValueError):
        pass
    # Line breaks are common in pasted base64 (e.g. `base64` wraps at 76 columns); anything else is not.
    # (Only here: a regex pass over a megabyte string holds the GIL for milliseconds.)
    data = _WHITESPACE.sub("", data)
    if not data:
        raise bad_request("invalid_base64", "The image is empty.", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("invalid_base64", "The image is not valid base64.", param) from None


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Return (w, h) with the longest side at most max_side, keeping the aspect ratio."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    # EXIF orientations 5-8 swap the axes.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _to_rgb(image: Image.Image) -> Image.Image:
    # A tRNS colour key (PNG) makes that colour transparent in P, L and RGB images alike.
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit greyscale PNG: scale to 8 bits, or convert() clips almost every pixel to white.
        image = image.point(lambda value: value * (1 / 256))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def open_image(
    raw: bytes,
    *,
    max_side: int,
    max_pixels: int,
    param: str = "image",
    fit: Fit | None = None,
    budget: PixelBudget | None = None,
) -> DecodedImage:
    """Decode image bytes: size checks before decoding, EXIF orientation, RGB on white, resize.

    With `fit`, an image the processor would shrink anyway is decoded and resized straight to
    that size: JPEGs decode at reduced scale and the processor has no big resize left to do.
    With a `budget` too, the image is resized (up or down) to fit its own bounds; the processor,
    under the server's wider ones, then leaves it as it is.
    """
    try:
        with warnings.catch_warnings():
            # We check the pixel count ourselves right below, against our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:
        raise _too_many_pixels(None, max_pixels, param) from None
    except UnidentifiedImageError:
        raise bad_request(
            "unsupported_image_format",
            f"The image could not be identified; supported formats are {', '.join(FORMATS)}.",
            param,
        ) from None
    except Exception:  # noqa: BLE001 - any parser failure on client bytes is a bad image
        raise bad_request("invalid_image", "The image could not be decoded.", param) from None

    # Header only so far: refuse bombs and degenerate shapes before any pixel is decoded.
    width, height = image.size
    if width < 1 or height < 1:
        raise bad_request("invalid_image", "The image has no pixels.", param)
    if width * height > max_pixels:
        raise _too_many_pixels(width * height, max_pixels, param)
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise bad_request(
            "unsupported_aspect_ratio",
            f"The image is {width}x{height}; the longer side may be at most {MAX_ASPECT_RATIO}x the shorter.",
            param,
        )

    source_format = image.format
    untouched = image.mode == "RGB" and "transparency" not in image.info
    try:
        untouched = untouched and image.getexif().get(0x0112, 1) == 1
        width, height = _oriented_size(image)
        goal = target_size(width, height, max_side)
        # Rounding the short side down must not push an accepted shape past the processor's limit.
        shortest = -(-max(goal) // MAX_ASPECT_RATIO)
        goal = (max(goal[0], shortest), max(goal[1], shortest))
        final = goal
        if fit is not None and budget is not None and not budget.is_default:
            final = fit(*goal, budget)
        elif fit is not None:
            fitted = fit(*goal)
            if fitted[0] * fitted[1] < goal[0] * goal[1]:
                final = fitted
        if image.format in ("JPEG", "MPO"):  # MPO: multi-picture JPEG from cameras
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the target size.
            oriented_final = final if _oriented_size(image) == image.size else final[::-1]
            image.draft("RGB", oriented_final)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # a copy only costs: 2 ms at 1024x1024
        image = _to_rgb(image)
        if image.size != final:
            image = image.resize(final, Image.Resampling.BICUBIC, reducing_gap=3.0)
    except Image.DecompressionBombError:
        raise _too_many_pixels(None, max_pixels, param) from None
    except APIError:  # the budget's own bounds, refused by `fit`
        raise
    except Exception:  # noqa: BLE001 - any decoder failure on client bytes is a bad image
        raise bad_request("invalid_image", "The image data is corrupt or truncated.", param) from None
    budget = None if budget is None or budget.is_default else budget
    if untouched and image.size == (width, height) and source_format in _MIMES:
        return DecodedImage(image, width, height, image.size, raw, _MIMES[source_format], budget)
    return DecodedImage(image=image, width=width, height=height, resized_to=image.size, budget=budget)


# Formats an upstream engine takes as they are (GIF and BMP are re-encoded: not every engine reads them).
_MIMES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def _too_many_pixels(pixels: int | None, max_pixels: int, param: str) -> APIError:
    size = f" has {pixels:,} pixels;" if pixels else " is too large;"
    return APIError(
        413, "image_too_large", f"The image{size} at most {max_pixels:,} pixels are accepted.", param
    )


def decode_image(
    data: str,
    *,
    max_side: int,
    max_pixels: int,
    param: str = "image",
    fit: Fit | None = None,
    budget: PixelBudget | None = None,
) -> DecodedImage:
    """Decode a base64 or data-URL image string into a bounded RGB image."""
    raw = decode_base64(data, param)
    return open_image(raw, max_side=max_side, max_pixels=max_pixels, param=param, fit=fit, budget=budget)
