"""The vision tower's output per image, kept by the image's hash: a later request, turn or row that
carries the same picture skips the vision tower.

Keyed by the hash the worker made of the image as the processor got it (pixels after resizing, and
the processing options), or, for inputs made without one, of the processor's own output. Adapters
cannot change it: vision-tower adapters are refused at start (backends/local/adapters.py). Bounded
in bytes, least recently used out; only the model thread touches it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from glmvision.backends.local.imagecache import row_digests

MIB = 1 << 20


def encoder_cache_bytes(setting_mb: float, device: str) -> int:
    """GLMVISION_ENCODER_CACHE_MB in bytes: -1 picks by device (1 GiB on a GPU, 256 MiB elsewhere)."""
    if setting_mb < 0:
        setting_mb = 1024 if device.startswith("cuda") else 256
    return int(setting_mb * MIB)


def image_hashes(inputs: Any) -> list[int]:
    """One hash per image of a single prompt's inputs: the worker's, else one of the processor's output."""
    hashes = inputs.get("image_hashes")
    if hashes is not None:
        return [int.from_bytes(digest, "little") for digest in row_digests(hashes)]
    grids = inputs.get("image_grid_thw")
    if grids is None:
        return []
    pixels = inputs["pixel_values"]
    found, start = [], 0
    for grid in grids.tolist():
        patches = grid[0] * grid[1] * grid[2]
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr(grid).encode())
        digest.update(pixels[start : start + patches].contiguous().cpu().numpy().tobytes())
        found.append(int.from_bytes(digest.digest(), "little"))
        start += patches
    return found


@dataclass
class EncoderStats:
    """Images found in the cache or not, and the ones evicted for room."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class EncoderCache:
    """Visual embeddings ([tokens, hidden], on the model's device) by image hash, bounded in bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = max(0, capacity_bytes)
        self.bytes = 0
        self.stats = EncoderStats()
        self._entries: OrderedDict[int, Any] = OrderedDict()

    def get(self, key: int) -> Any | None:
        features = self._entries.get(key)
        if features is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return features

    def put(self, key: int, features: Any) -> None:
        size = features.numel() * features.element_size()
        if size > self.capacity or key in self._entries:
            return
        self._entries[key] = features
        self.bytes += size
        while self.bytes > self.capacity:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
            self.stats.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def image_features(
    model: Any, inputs: dict[str, Any], hashes: list[int], wanted: list[int], cache: EncoderCache | None
) -> list[Any]:
    """The visual embeddings of the images numbered in `wanted` (of a batch's images, in order): from
    the cache where it has them, the rest from one vision-tower call."""
    import torch

    grids = inputs["image_grid_thw"]
    patches = grids.prod(dim=-1).tolist()
    starts = [0, *itertools.accumulate(patches)]
    found: dict[int, Any] = {}
    missing = []
    for index in wanted:
        cached = cache.get(hashes[index]) if cache is not None else None
        if cached is None:
            missing.append(index)
        else:
            found[index] = cached
    if missing:
        pixels = torch.cat([inputs["pixel_values"][starts[i] : starts[i + 1]] for i in missing], dim=0)
        inner = model.model.model
        out = inner.get_image_features(pixels, grids[missing], return_dict=True)
        for index, features in zip(missing, out.pooler_output, strict=True):
            found[index] = features
            if cache is not None:
                cache.put(hashes[index], features)
    return [found[index] for index in wanted]
