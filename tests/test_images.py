"""Image decoding: formats, EXIF orientation, alpha, resizing, size guards and client errors."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from helpers import b64, image_b64, image_bytes
from PIL import Image, ImageFile, JpegImagePlugin

from glmvision.core.errors import APIError
from glmvision.core.images import (
    MAX_ASPECT_RATIO,
    DecodedImage,
    decode_base64,
    decode_image,
    open_image,
    target_size,
)

BIG = 50_000_000


def _encode(image: Image.Image, fmt: str, **save: Any) -> bytes:
    """Encode a PIL image to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _open(raw: bytes, max_side: int = 2048, max_pixels: int = BIG, param: str = "image") -> DecodedImage:
    """Decode with generous limits unless told otherwise."""
    return open_image(raw, max_side=max_side, max_pixels=max_pixels, param=param)


def _api_error(call: Callable[[], object]) -> APIError:
    """Run `call` and return the APIError it must raise."""
    with pytest.raises(APIError) as info:
        call()
    return info.value


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a valid CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height RGB pixels, with an empty IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )


def _jpeg_with_orientation(width: int, height: int, orientation: int) -> bytes:
    """A JPEG stored width x height, left half red and right half blue, with an EXIF orientation."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(image, "JPEG", exif=exif, quality=95)


def _is_red(pixel: Any) -> bool:
    """Roughly pure red, allowing for JPEG loss."""
    return pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60


def _is_blue(pixel: Any) -> bool:
    """Roughly pure blue, allowing for JPEG loss."""
    return pixel[0] < 60 and pixel[1] < 60 and pixel[2] > 200


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    """Every supported format becomes an RGB image of the original size."""
    decoded = _open(image_bytes(64, 48, fmt))
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (64, 48)
    assert decoded.resized_to == (64, 48)


@pytest.mark.parametrize(
    ("mode", "colour", "fmt", "expected"),
    [
        ("L", 90, "JPEG", (90, 90, 90)),
        ("L", 90, "PNG", (90, 90, 90)),
        ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),
        ("1", 1, "BMP", (255, 255, 255)),
        ("1", 0, "PNG", (0, 0, 0)),
        ("I;16", 30000, "PNG", (117, 117, 117)),  # 16-bit grey scaled to 8 bits, not clipped to white
        ("I;16", 65535, "PNG", (255, 255, 255)),
        ("I;16", 0, "PNG", (0, 0, 0)),
    ],
)
def test_other_modes_become_rgb(mode: str, colour: Any, fmt: str, expected: tuple[int, int, int]) -> None:
    """Greyscale, CMYK, 1-bit and 16-bit images convert to RGB with the right colour."""
    decoded = _open(_encode(Image.new(mode, (16, 8), colour), fmt))
    assert decoded.image.mode == "RGB"
    pixel = decoded.image.getpixel((3, 3))
    assert isinstance(pixel, tuple)
    assert all(abs(a - b) <= 2 for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_use_the_first_frame(fmt: str) -> None:
    """A two-frame animation decodes to its first frame's colour."""
    first = Image.new("RGB", (8, 8), (255, 0, 0))
    second = Image.new("RGB", (8, 8), (0, 0, 255))
    raw = _encode(first, fmt, save_all=True, append_images=[second], lossless=True)
    assert getattr(Image.open(io.BytesIO(raw)), "n_frames", 1) == 2
    decoded = _open(raw)
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("orientation", "top_is_red"),
    [(6, True), (8, False)],
)
def test_exif_orientation_is_applied(orientation: int, top_is_red: bool) -> None:
    """Orientations 6 and 8 rotate a stored 40x20 JPEG to an upright 20x40 one."""
    decoded = _open(_jpeg_with_orientation(40, 20, orientation))
    assert (decoded.width, decoded.height) == (20, 40)
    assert decoded.image.size == (20, 40)
    top, bottom = decoded.image.getpixel((10, 3)), decoded.image.getpixel((10, 36))
    assert _is_red(top if top_is_red else bottom)
    assert _is_blue(bottom if top_is_red else top)


@pytest.mark.parametrize(
    ("stored", "orientation", "max_side", "reported", "resized"),
    [
        ((4000, 2000), 6, 2048, (2000, 4000), (1024, 2048)),
        ((4000, 2000), 8, 2048, (2000, 4000), (1024, 2048)),
        ((4000, 2000), 1, 2048, (4000, 2000), (2048, 1024)),
        ((4000, 3000), 1, 2048, (4000, 3000), (2048, 1536)),
        ((8192, 100), 1, 2048, (8192, 100), (2048, 25)),
        ((3000, 4000), 6, 1000, (4000, 3000), (1000, 750)),
        ((1000, 1000), 1, 123, (1000, 1000), (123, 123)),
    ],
)
def test_jpeg_reduced_scale_decode_hits_the_exact_target(
    monkeypatch: pytest.MonkeyPatch,
    stored: tuple[int, int],
    orientation: int,
    max_side: int,
    reported: tuple[int, int],
    resized: tuple[int, int],
) -> None:
    """Large JPEGs go through draft() and still come out at exactly target_size, upright."""
    drafts: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> Any:
        assert size is not None
        drafts.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = _encode(Image.new("RGB", stored, (10, 200, 30)), "JPEG", exif=exif)
    decoded = _open(raw, max_side=max_side)
    assert (decoded.width, decoded.height) == reported
    assert decoded.resized_to == resized
    assert decoded.image.mode == "RGB"
    # draft() is asked for the target in stored (not upright) orientation.
    assert drafts == [resized[::-1] if orientation in (6, 8) else resized]


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),
        ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (0, 255), (0, 0, 0)),
        ("LA", (0, 128), (127, 127, 127)),
    ],
)
def test_alpha_is_composited_on_white(
    mode: str, colour: tuple[int, ...], expected: tuple[int, int, int]
) -> None:
    """Transparent pixels become white, half-transparent black becomes grey."""
    decoded = _open(_encode(Image.new(mode, (10, 10), colour), "PNG"))
    assert decoded.image.mode == "RGB"
    pixel = decoded.image.getpixel((5, 5))
    assert isinstance(pixel, tuple)
    assert all(abs(a - b) <= 1 for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_white(fmt: str) -> None:
    """A palette image whose index 0 is transparent shows white there and its colour elsewhere."""
    image = Image.new("P", (10, 10), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    image.paste(1, (5, 0, 10, 10))
    decoded = _open(_encode(image, fmt, transparency=0))
    assert decoded.image.getpixel((1, 1)) == (255, 255, 255)
    assert decoded.image.getpixel((8, 8)) == (0, 255, 0)


@pytest.mark.parametrize(
    ("mode", "key", "other"),
    [("RGB", (10, 20, 30), (200, 0, 0)), ("L", 7, 99)],
)
def test_png_colour_key_transparency_is_white(mode: str, key: Any, other: Any) -> None:
    """A tRNS colour key in an RGB or greyscale PNG is transparent, so white."""
    image = Image.new(mode, (10, 10), key)
    image.paste(other, (5, 0, 10, 10))
    decoded = _open(_encode(image, "PNG", transparency=key))
    assert decoded.image.getpixel((1, 1)) == (255, 255, 255)
    assert decoded.image.getpixel((8, 8)) != (255, 255, 255)


@pytest.mark.parametrize(
    ("width", "height", "max_side", "expected"),
    [
        (100, 50, 200, (100, 50)),
        (200, 100, 200, (200, 100)),
        (201, 100, 200, (200, 100)),
        (4000, 3000, 2048, (2048, 1536)),
        (3000, 4000, 2048, (1536, 2048)),
        (8192, 100, 2048, (2048, 25)),
        (2049, 2049, 2048, (2048, 2048)),
        (1000, 333, 100, (100, 33)),
        (1000, 336, 100, (100, 34)),
        (6144, 1000, 2048, (2048, 333)),
        (3001, 2, 2048, (2048, 1)),
        (100_000, 1, 2048, (2048, 1)),
        (1, 100_000, 28, (1, 28)),
        (5, 3, 1, (1, 1)),
    ],
)
def test_target_size(width: int, height: int, max_side: int, expected: tuple[int, int]) -> None:
    """The longest side is capped, the ratio kept with rounding, and no side is ever 0."""
    assert target_size(width, height, max_side) == expected


@pytest.mark.parametrize("max_side", [28, 100, 777, 2048])
@pytest.mark.parametrize(("width", "height"), [(4000, 3000), (123, 4567), (9999, 10), (3000, 3000)])
def test_target_size_bounds(width: int, height: int, max_side: int) -> None:
    """Downscaled sizes touch max_side exactly and keep the ratio within rounding."""
    new_w, new_h = target_size(width, height, max_side)
    assert max(new_w, new_h) == max_side
    assert min(new_w, new_h) >= 1
    scale = max_side / max(width, height)
    assert abs(new_w - max(1.0, width * scale)) <= 0.5 + 1e-9
    assert abs(new_h - max(1.0, height * scale)) <= 0.5 + 1e-9


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((64, 48), 2048, (64, 48)),
        ((64, 48), 64, (64, 48)),
        ((64, 48), 32, (32, 24)),
        ((48, 64), 32, (24, 32)),
        ((300, 100), 150, (150, 50)),
    ],
)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_open_image_resizes(
    size: tuple[int, int], max_side: int, expected: tuple[int, int], fmt: str
) -> None:
    """The decoded image is target_size; small images are untouched; the original size is reported."""
    decoded = _open(image_bytes(*size, fmt=fmt), max_side=max_side)
    assert decoded.resized_to == expected == decoded.image.size
    assert (decoded.width, decoded.height) == size


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (10_000, 10_000), (8_000, 8_000)])
def test_pixel_bomb_header_is_refused_without_decoding(
    monkeypatch: pytest.MonkeyPatch, width: int, height: int
) -> None:
    """A tiny PNG claiming a huge size is a 413 before any pixel is decoded."""
    raw = _png_header_only(width, height)
    assert len(raw) < 100

    def no_decoding(self: Image.Image) -> Any:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    error = _api_error(lambda: _open(raw, max_pixels=BIG))
    assert (error.code, error.error_code, error.param) == (413, "image_too_large", "image")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_png_header_only(100_000, 100_000), "The image is too large; at most 1,000 pixels are accepted."),
        (image_bytes(64, 48), "The image has 3,072 pixels; at most 1,000 pixels are accepted."),
    ],
)
def test_pixel_limit_message(raw: bytes, message: str) -> None:
    """The 413 message states the limit in pixels."""
    assert _api_error(lambda: _open(raw, max_pixels=1000)).description == message


@pytest.mark.parametrize(("max_pixels", "ok"), [(3071, False), (3072, True), (1, False)])
def test_max_pixels_limit(max_pixels: int, ok: bool) -> None:
    """A 64x48 image passes a limit of exactly 3072 pixels and is a 413 below it."""
    raw = image_bytes(64, 48)
    if ok:
        assert _open(raw, max_pixels=max_pixels).resized_to == (64, 48)
    else:
        error = _api_error(lambda: _open(raw, max_pixels=max_pixels))
        assert (error.code, error.error_code, error.param) == (413, "image_too_large", "image")


@pytest.mark.parametrize(
    ("width", "height", "ok"),
    [
        (1, 5000, False),
        (5000, 1, False),
        (201, 1, False),
        (400, 2, True),
        (401, 2, False),
        (200, 1, True),
        (1, 200, True),
        (2000, 10, True),
    ],
)
def test_aspect_ratio_limit(width: int, height: int, ok: bool) -> None:
    """Sides may differ by a factor of 200 at most."""
    raw = _encode(Image.new("RGB", (width, height), (1, 2, 3)), "PNG")
    if ok:
        assert _open(raw).resized_to == (width, height)
    else:
        error = _api_error(lambda: _open(raw))
        assert (error.code, error.error_code, error.param) == (400, "unsupported_aspect_ratio", "image")


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((20_000, 100), 2048, (2048, 11)),
        ((100, 20_000), 2048, (11, 2048)),
        ((5600, 28), 2048, (2048, 11)),
        ((4000, 20), 1000, (1000, 5)),
    ],
)
def test_resizing_keeps_accepted_ratios_within_the_limit(
    size: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    """Rounding the short side down never turns an accepted ratio into one the processor refuses."""
    decoded = _open(_encode(Image.new("RGB", size, (1, 2, 3)), "PNG"), max_side=max_side)
    assert decoded.resized_to == expected
    assert max(expected) / min(expected) <= MAX_ASPECT_RATIO


def _truncated(fmt: str) -> bytes:
    """The first half of a real image."""
    raw = image_bytes(200, 150, fmt)
    return raw[: len(raw) // 2]


def _tiff() -> bytes:
    return image_bytes(16, 16, "TIFF")


def _ico() -> bytes:
    return image_bytes(16, 16, "ICO")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("!!!notbase64", "invalid_base64"),
        ("aGVsbG8", "invalid_base64"),
        ("aGVsbG8===", "invalid_base64"),
        ("", "invalid_base64"),
        (" \n\t", "invalid_base64"),
        ("héllo", "invalid_base64"),
        ("data:image/png;base64,", "invalid_base64"),
        ("data:image/png,notbase64", "invalid_base64"),
        ("data:image/png;base64,!!!", "invalid_base64"),
        ("data:text/plain;base64,aGVsbG8=", "unsupported_image_format"),
        ("data:application/octet-stream;base64,aGVsbG8=", "unsupported_image_format"),
        (b64(b"just some text, certainly not an image\n"), "unsupported_image_format"),
        (b64(b""), "invalid_base64"),
        (b64(_tiff()), "unsupported_image_format"),
        (b64(_ico()), "unsupported_image_format"),
        (b64(b"%PDF-1.4\n%%EOF\n"), "unsupported_image_format"),
        (b64(_truncated("PNG")), "invalid_image"),
        (b64(_truncated("JPEG")), "invalid_image"),
    ],
)
def test_decode_image_client_errors(data: str, code: str) -> None:
    """Bad base64, non-images, unsupported formats and truncated images are 400s with stable codes."""
    error = _api_error(lambda: decode_image(data, max_side=2048, max_pixels=BIG))
    assert (error.code, error.error_code, error.param) == (400, code, "image")
    assert error.description


def test_spaces_inside_base64_are_ignored() -> None:
    """A space inside base64 is stripped like a line break."""
    raw = image_bytes()
    text = b64(raw)
    spaced = text[:10] + " " + text[10:]
    assert decode_base64(spaced) == raw


@pytest.mark.parametrize(
    "wrap",
    [
        lambda text: text,
        lambda text: base64.encodebytes(base64.b64decode(text)).decode("ascii"),
        lambda text: "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76)),
        lambda text: f"\n{text}\n",
        lambda text: f"data:image/png;base64,{text}",
        lambda text: f"DATA:IMAGE/PNG;BASE64,{text}",
        lambda text: f"data:image/jpeg;name=photo.png;base64,{text}",
        lambda text: f"data:;base64,{text}",
    ],
    ids=[
        "plain",
        "encodebytes",
        "crlf",
        "surrounding-newlines",
        "data-url",
        "upper-data-url",
        "params",
        "no-mime",
    ],
)
def test_accepted_base64_spellings(wrap: Callable[[str], str]) -> None:
    """Wrapped base64 and data URLs decode to the original bytes and image."""
    raw = image_bytes(300, 200)
    text = wrap(b64(raw))
    assert decode_base64(text) == raw
    assert decode_image(text, max_side=2048, max_pixels=BIG).resized_to == (300, 200)


@pytest.mark.parametrize(
    ("data", "max_pixels", "status", "code"),
    [
        ("!!!", BIG, 400, "invalid_base64"),
        ("data:text/plain;base64,aGk=", BIG, 400, "unsupported_image_format"),
        (b64(b"plain text"), BIG, 400, "unsupported_image_format"),
        (b64(_truncated("PNG")), BIG, 400, "invalid_image"),
        (image_b64(64, 48), 100, 413, "image_too_large"),
        (b64(_encode(Image.new("RGB", (1, 500)), "PNG")), BIG, 400, "unsupported_aspect_ratio"),
    ],
)
def test_custom_param_is_carried(data: str, max_pixels: int, status: int, code: str) -> None:
    """Every error names the field the image came from."""
    param = "messages.0.content.1"
    error = _api_error(lambda: decode_image(data, max_side=2048, max_pixels=max_pixels, param=param))
    assert (error.code, error.error_code, error.param) == (status, code, param)


def _corrupt_middle(raw: bytes, seed: int) -> bytes:
    """Overwrite a run of bytes in the middle of `raw` with seeded noise."""
    rng = random.Random(seed)
    data = bytearray(raw)
    start = len(data) // 3
    for offset in range(start, min(len(data), start + 24)):
        data[offset] = rng.randrange(256)
    return bytes(data)


def _fuzz_cases() -> list[Any]:
    """Seeded garbage and damaged real images."""
    rng = random.Random(1234)
    cases: list[Any] = [
        pytest.param(bytes(rng.randrange(256) for _ in range(n)), id=f"random-{n}") for n in (1, 8, 64, 4096)
    ]
    cases.append(
        pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(300)), id="png-sig")
    )
    cases.append(pytest.param(b"\xff\xd8\xff" + bytes(rng.randrange(256) for _ in range(300)), id="jpeg-sig"))
    cases.append(pytest.param(b"GIF89a" + bytes(rng.randrange(256) for _ in range(300)), id="gif-sig"))
    cases.append(pytest.param(b"RIFF\x00\x01\x00\x00WEBPVP8 " + bytes(300), id="webp-sig"))
    cases.append(pytest.param(b"BM" + bytes(rng.randrange(256) for _ in range(300)), id="bmp-sig"))
    cases.append(pytest.param(_png_header_only(0, 10), id="png-zero-width"))
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP"):
        raw = image_bytes(120, 90, fmt)
        for seed in range(3):
            cases.append(pytest.param(_corrupt_middle(raw, seed), id=f"{fmt.lower()}-corrupt-{seed}"))
        cases.append(pytest.param(raw[: len(raw) // 3], id=f"{fmt.lower()}-third"))
        cases.append(pytest.param(raw[:20], id=f"{fmt.lower()}-header-cut"))
    return cases


@pytest.mark.parametrize("raw", _fuzz_cases())
def test_damaged_bytes_raise_only_api_errors(raw: bytes) -> None:
    """Garbage either decodes to a bounded RGB image or is a 400; nothing else escapes."""
    try:
        decoded = _open(raw, max_side=64)
    except APIError as error:
        assert error.code == 400
        assert error.error_code in {"invalid_image", "unsupported_image_format"}
        assert error.param == "image"
    else:
        assert decoded.image.mode == "RGB"
        assert max(decoded.image.size) <= 64


def test_fit_shrinks_the_decoded_image_and_reports_that_size() -> None:
    from glmvision.core.images import open_image

    raw = image_bytes(1600, 1200, "JPEG", quality=90)
    decoded = open_image(raw, max_side=1024, max_pixels=50_000_000, fit=lambda w, h: (w // 4, h // 4))
    assert decoded.resized_to == decoded.image.size == (256, 192)
    # A fit that would enlarge is ignored: the processor upscales small images itself.
    same = open_image(raw, max_side=1024, max_pixels=50_000_000, fit=lambda w, h: (w * 2, h * 2))
    assert same.image.size == (1024, 768)
