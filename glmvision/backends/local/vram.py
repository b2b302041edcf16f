"""VRAM hygiene: give cached CUDA memory back when a worker holds too much of the GPU.

The engine's model thread calls this between batches, never a request thread: the check costs a
CUDA call, and emptying the cache while a batch runs would only make it allocate again.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger("glmvision")


class CudaMemory(Protocol):
    """The part of `torch.cuda` this hook uses (a stand-in in tests)."""

    def memory_reserved(self, device: Any = None) -> int: ...

    def memory_allocated(self, device: Any = None) -> int: ...

    def max_memory_allocated(self, device: Any = None) -> int: ...

    def get_device_properties(self, device: Any) -> Any: ...

    def empty_cache(self) -> None: ...

    def reset_peak_memory_stats(self, device: Any = None) -> None: ...


def maybe_empty_cache(cuda: CudaMemory, device: str, fraction: float) -> bool:
    """Empty the CUDA cache if reserved memory exceeds `fraction` of the device; True if it did."""
    if not device.startswith("cuda"):
        return False
    total = cuda.get_device_properties(device).total_memory
    reserved = cuda.memory_reserved(device)
    if reserved <= fraction * total:
        return False
    cuda.empty_cache()
    log.info("emptied CUDA cache: %.0f%% of %s was reserved", 100 * reserved / total, device)
    return True


def memory_report(cuda: CudaMemory, device: str) -> tuple[int, int, int] | None:
    """(allocated, reserved, total) bytes of a CUDA device; None for any other device."""
    if not device.startswith("cuda"):
        return None
    total = cuda.get_device_properties(device).total_memory
    return cuda.memory_allocated(device), cuda.memory_reserved(device), total


def cuda_module() -> CudaMemory:
    """Return `torch.cuda` (imported only once a model runs on a GPU)."""
    import torch

    return torch.cuda


def release_cuda_cache() -> None:
    """Return cached CUDA blocks to the driver, if CUDA is in use."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
