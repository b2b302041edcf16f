"""VRAM hygiene: give cached CUDA memory back when a worker holds too much of the GPU."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from flask import Flask
from flask.wrappers import Response

log = logging.getLogger("glmvision")


class CudaMemory(Protocol):
    """The part of `torch.cuda` this hook uses (a stand-in in tests)."""

    def memory_reserved(self, device: Any = None) -> int: ...

    def get_device_properties(self, device: Any) -> Any: ...

    def empty_cache(self) -> None: ...


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


def cuda_module() -> CudaMemory:
    """Return `torch.cuda` (imported only once a model runs on a GPU)."""
    import torch

    return torch.cuda


def init_app(app: Flask) -> None:
    """After each request, empty the CUDA cache when the worker's GPU is nearly full."""
    fraction = app.config["GLMVISION_EMPTY_CACHE_FRACTION"]

    def after(response: Response) -> Response:
        loaded = app.extensions["glmvision.model"].loaded
        if loaded is not None and loaded.device.startswith("cuda"):
            try:
                maybe_empty_cache(cuda_module(), loaded.device, fraction)
            except Exception:  # hygiene must never fail a finished request
                log.exception("VRAM check failed")
        return response

    app.after_request(after)
