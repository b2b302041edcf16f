"""A worker's cache of the image processor's output, keyed by the decoded pixels and the processing options.

Clients ask about one image again and again; resizing, normalising and patchifying it each time costs
far more than hashing its pixels. The key is the image as handed to the processor (mode, size, pixel
bytes), never its URL or encoded bytes, so one picture sent as PNG or lossless WEBP is one entry.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DIGEST_BYTES = 16
_OUTPUT_KEYS = ("pixel_values", "image_grid_thw")


def cache_budget_bytes(megabytes: float, device: str) -> int:
    """GLMVISION_ENCODER_CACHE_MB in bytes: -1 is 1024 MiB on a GPU and 256 on the CPU; 0 is off."""
    if megabytes < 0:
        megabytes = 1024 if device.startswith("cuda") else 256
    return int(megabytes * 2**20)


def options_digest(image_processor: Any, kwargs: dict[str, Any]) -> bytes:
    """What, besides the pixels, decides the processor's output: its configuration and the call's kwargs."""
    config = image_processor.to_dict() if hasattr(image_processor, "to_dict") else vars(image_processor)
    text = repr((type(image_processor).__qualname__, sorted(config.items()), sorted(kwargs.items())))
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


def image_digest(image: Any, options: bytes) -> bytes:
    """The 16-byte key of one decoded image (a PIL image, or an array) processed with `options`."""
    digest = hashlib.blake2b(options, digest_size=DIGEST_BYTES)
    if hasattr(image, "tobytes") and hasattr(image, "mode"):  # PIL
        palette = image.getpalette() if image.mode in ("P", "PA") else None
        # convert("RGB") reads the palette and a transparent colour: both change the pixels processed.
        digest.update(repr((image.mode, image.size, palette, image.info.get("transparency"))).encode())
        digest.update(image.tobytes())
    else:
        import numpy as np

        array = np.ascontiguousarray(np.asarray(image))
        digest.update(repr((array.dtype.str, array.shape)).encode())
        digest.update(array.data)
    return digest.digest()


def digest_rows(digests: list[bytes]) -> torch.Tensor:
    """Digests as an int64 tensor of shape [images, 2]: each digest's two little-endian halves."""
    import numpy as np
    import torch

    rows = np.frombuffer(b"".join(digests), dtype="<i8").astype(np.int64).reshape(len(digests), 2)
    return torch.from_numpy(rows)


def row_digests(rows: torch.Tensor) -> list[bytes]:
    """The digests `digest_rows` made these rows of."""
    flat = rows.cpu().numpy().astype("<i8").tobytes()
    return [flat[i : i + DIGEST_BYTES] for i in range(0, len(flat), DIGEST_BYTES)]


Entry = tuple["torch.Tensor", "torch.Tensor"]  # one image's pixel_values rows and its image_grid_thw row


class ImageCache:
    """Processed images by key, bounded in bytes, least recently used out; safe for many threads."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self._entries: OrderedDict[bytes, tuple[Entry, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def bytes(self) -> int:
        """Bytes of tensors held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Entry | None:
        """The entry under `key` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key: bytes, pixels: torch.Tensor, grid: torch.Tensor) -> None:
        """Keep one image's output; the least recently used go until it fits (one too big is not kept)."""
        size = pixels.numel() * pixels.element_size() + grid.numel() * grid.element_size()
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:  # another thread processed the same image meanwhile
                self._bytes -= old[1]
            while self._entries and self._bytes + size > self.budget_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed
                self.evictions += 1
            self._entries[key] = ((pixels, grid), size)
            self._bytes += size

    def stats(self) -> dict[str, int]:
        """Counters for metrics and /readyz."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "budget_bytes": self.budget_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }


def _flatten(images: Any) -> list[Any]:
    """Images nested in lists (one list per conversation) as one flat list, in order."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]


class CachingImageProcessor:
    """Stands in for a processor copy's image processor: hashes every image, answers cached ones from
    the cache and runs the real image processor once on the rest. One thread uses it at a time (the
    processor copy's), so `digests` (the last call's keys, in order) is that thread's own."""

    def __init__(self, inner: Any, cache: ImageCache) -> None:
        self._inner = inner
        self._cache = cache
        self.digests: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_inner")
        if inner is None:  # mid-copy or unpickling: nothing to delegate to yet
            raise AttributeError(name)
        return getattr(inner, name)

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> Any:
        if images is None or args:
            return self._inner(images, *args, **kwargs)
        flat = _flatten(images)
        options = options_digest(self._inner, kwargs)
        keys = [image_digest(image, options) for image in flat]
        self.digests.extend(keys)
        if not self._cache.enabled or kwargs.get("return_tensors") != "pt":
            return self._inner(images, **kwargs)
        return self._answer(images, flat, keys, kwargs)

    def _answer(self, images: Any, flat: list[Any], keys: list[bytes], kwargs: dict[str, Any]) -> Any:
        import torch

        found: dict[bytes, Entry] = {}
        missing: dict[bytes, Any] = {}  # each image not cached, once (a repeated one is processed once)
        for key, image in zip(keys, flat, strict=True):
            if key in found or key in missing:
                continue
            entry = self._cache.get(key)
            if entry is None:
                missing[key] = image
            else:
                found[key] = entry
        output = None
        if missing:
            output = self._inner(list(missing.values()), **kwargs)
            pieces = _split(output, len(missing))
            if pieces is None:  # not the layout this cache knows: leave this call to the processor
                return self._inner(images, **kwargs)
            for key, (pixels, grid) in zip(missing, pieces, strict=True):
                if len(pieces) > 1:  # a slice would keep the whole batch's tensor alive, uncounted
                    pixels, grid = pixels.clone(), grid.clone()
                self._cache.put(key, pixels, grid)
                found[key] = (pixels, grid)
            if len(missing) == len(keys):  # every image new and distinct: the processor's answer is it
                return output
        from transformers import BatchFeature

        # One image's tensors are handed out as cached, not copied (a copy of a photo's ~70 MiB costs
        # about as much as hashing it): prepared inputs are read-only, as the model treats them.
        pixels = torch.cat([found[key][0] for key in keys]) if len(keys) > 1 else found[keys[0]][0]
        grids = torch.cat([found[key][1] for key in keys]) if len(keys) > 1 else found[keys[0]][1]
        return BatchFeature({"pixel_values": pixels, "image_grid_thw": grids}, tensor_type="pt")


def _split(output: Any, count: int) -> list[Entry] | None:
    """The processor's output for `count` images as each image's (pixel rows, grid row); None when the
    output is not the pixel_values + image_grid_thw layout this cache knows."""
    import torch

    if set(output.keys()) != set(_OUTPUT_KEYS):
        return None
    pixels, grids = output["pixel_values"], output["image_grid_thw"]
    if not isinstance(pixels, torch.Tensor) or not isinstance(grids, torch.Tensor):
        return None
    if grids.dim() != 2 or grids.shape[0] != count:
        return None
    rows = [int(n) for n in grids.prod(dim=-1).tolist()]
    if sum(rows) != pixels.shape[0]:
        return None
    return [(part, grids[i : i + 1]) for i, part in enumerate(pixels.split(rows))]
