"""Videos: decoded with PyAV into frames sampled at up to 2 fps, under caps checked from the container's
metadata first and enforced again while decoding (metadata can lie)."""

from __future__ import annotations

import io
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glmvision.core.errors import APIError, bad_request
from glmvision.core.images import decode_base64

if TYPE_CHECKING:
    import numpy as np

    from glmvision.core.config import Settings

SAMPLE_FPS = 2.0  # GLM-4.6V's sampling rate
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class VideoLimits:
    """The caps on one video: length, frames decoded, bytes, frame size, sampled pixels and time."""

    max_seconds: float
    max_frames: int
    max_bytes: int
    max_frame_pixels: int
    max_pixels: int
    timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoLimits:
        """The GLMVISION_MAX_VIDEO_* and GLMVISION_VIDEO_DECODE_TIMEOUT settings."""
        return cls(
            settings.max_video_seconds,
            settings.max_video_frames,
            int(settings.max_video_mb * 1024 * 1024),
            settings.max_video_frame_pixels,
            settings.max_video_pixels,
            settings.video_decode_timeout,
        )


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled RGB frames [frames, height, width, 3], and where each came from in the source."""

    frames: np.ndarray
    fps: float  # the source's frame rate, as the processor's timestamps count it
    indices: tuple[int, ...]  # each sampled frame's number among the decoded ones
    duration: float
    width: int  # the source's size
    height: int

    def metadata(self) -> dict[str, Any]:
        """The processor's video metadata: frame rate, frame numbers and size (timestamps come from these)."""
        return {
            "total_num_frames": (self.indices[-1] + 1) if self.indices else 0,
            "fps": self.fps,
            "width": self.width,
            "height": self.height,
            "duration": self.duration,
            "frames_indices": list(self.indices),
        }


def _too_large(message: str, param: str) -> APIError:
    return bad_request("video_too_large", message, param)


def _bad(message: str, param: str) -> APIError:
    return bad_request("bad_video", message, param)


def video_bytes(data: str, limits: VideoLimits, param: str) -> bytes:
    """Strict base64, optionally a `data:video/...;base64,` URL, under the byte cap."""
    match = _DATA_URL.match(data)
    if match:
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("video/"):
            raise _bad(f"Data URL type {mime!r} is not a video.", param)
        data = data[match.end() :]
    if len(data) * 3 // 4 > limits.max_bytes:
        raise _too_large(f"The video is larger than {limits.max_bytes / (1024 * 1024):g} MiB.", param)
    try:
        return decode_base64(data, param)
    except APIError:
        raise _bad("The video is not valid base64.", param) from None


def _frame_size(width: int, height: int, budget: int) -> tuple[int, int]:
    """The size within `budget` pixels (width x height), the aspect kept, each side at least 28."""
    if width * height <= budget:
        return width, height
    scale = math.sqrt(budget / (width * height))
    return max(28, int(width * scale)), max(28, int(height * scale))


def decode_video(raw: bytes, limits: VideoLimits, param: str = "video") -> DecodedVideo:
    """Frames at up to 2 fps of the first video stream; 400 bad_video or video_too_large, never more."""
    import av
    import numpy as np

    if len(raw) > limits.max_bytes:
        raise _too_large(f"The video is larger than {limits.max_bytes / (1024 * 1024):g} MiB.", param)
    deadline = time.monotonic() + limits.timeout
    try:
        container = av.open(io.BytesIO(raw), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError, EOFError):
        raise _bad("The video's container could not be read.", param) from None
    try:
        streams = container.streams.video
        if not streams:
            raise _bad("The file has no video stream.", param)
        stream = streams[0]
        stream.thread_type = "NONE"  # one thread per request: the workers' threads are the parallelism
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        # The metadata's claims, checked before anything is decoded.
        if width * height > limits.max_frame_pixels:
            raise _too_large(
                f"The video's frames are {width}x{height}; at most {limits.max_frame_pixels:,} pixels.", param
            )
        claimed = _claimed_seconds(container, stream)
        if claimed is not None and claimed > limits.max_seconds:
            raise _too_large(
                f"The video is {claimed:.1f} s long; at most {limits.max_seconds:g} s are accepted.", param
            )
        if stream.frames and stream.frames > limits.max_frames:
            raise _too_large(
                f"The video has {stream.frames} frames; at most {limits.max_frames} are decoded.", param
            )
        expected = max(2, math.ceil(min(claimed or limits.max_seconds, limits.max_seconds) * SAMPLE_FPS) + 1)
        budget = max(28 * 28, limits.max_pixels // expected)
        return _sample(container, stream, limits, budget, deadline, param, np)
    except (av.FFmpegError, ValueError, OSError, EOFError, MemoryError):
        raise _bad("The video is corrupt or truncated.", param) from None
    finally:
        container.close()


def _claimed_seconds(container: Any, stream: Any) -> float | None:
    """The length the container or stream claims (None: it does not say)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _sample(
    container: Any, stream: Any, limits: VideoLimits, budget: int, deadline: float, param: str, np: Any
) -> DecodedVideo:
    """Decode every frame (counted against the caps), keeping one each half second of timestamps."""
    frames: list[Any] = []
    indices: list[int] = []
    pixels = 0
    next_at = 0.0
    last_time = 0.0
    decoded = 0
    width = height = 0
    for frame in container.decode(stream):
        decoded += 1
        if decoded > limits.max_frames:
            raise _too_large(f"The video holds more than {limits.max_frames} frames.", param)
        if time.monotonic() > deadline:
            raise _too_large(f"The video took over {limits.timeout:g} s to decode.", param)
        width, height = frame.width, frame.height
        if width * height > limits.max_frame_pixels:
            most = limits.max_frame_pixels
            raise _too_large(f"A frame is {width}x{height}; at most {most:,} pixels.", param)
        at = float(frame.time) if frame.time is not None else (decoded - 1) / SAMPLE_FPS
        if at > limits.max_seconds:
            raise _too_large(f"The video runs past {limits.max_seconds:g} s.", param)
        last_time = max(last_time, at)
        if at + 1e-6 < next_at:
            continue
        next_at = at + 1 / SAMPLE_FPS
        size = _frame_size(width, height, budget)
        pixels += size[0] * size[1]
        if pixels > limits.max_pixels:
            raise _too_large("The video's sampled frames are over the pixel budget.", param)
        image = frame.to_image()
        if size != (width, height):
            image = image.resize(size)
        frames.append(np.asarray(image.convert("RGB")))
        indices.append(decoded - 1)
    if not frames:
        raise _bad("The video has no frames.", param)
    # The processor counts frames in pairs (temporal patches of 2): an odd one repeats the last.
    if len(frames) % 2:
        frames.append(frames[-1])
        indices.append(indices[-1])
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:  # a stream that changes size midway: every frame at the first one's
        first = frames[0].shape
        frames = [f if f.shape == first else _resized(f, first, np) for f in frames]
    # Frame numbers over this rate give each sampled frame's time, as the processor writes it.
    fps = (decoded - 1) / last_time if last_time > 0 and decoded > 1 else float(stream.average_rate or 1)
    return DecodedVideo(np.stack(frames), float(fps), tuple(indices), last_time, int(width), int(height))


def _resized(frame: Any, shape: tuple[int, ...], np: Any) -> Any:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((shape[1], shape[0])))
