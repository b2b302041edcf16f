"""Pure decisions about where and in which precision the model runs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from glmvision.core.config import ConfigError

# Weights are not all the GPU needs: activations, the KV cache and image features come on top.
HEADROOM = 1.2
GIB = 1024**3

log = logging.getLogger("glmvision")


def resolve_device(requested: str, cuda_available: bool, cuda_count: int) -> str:
    """Map GLMVISION_DEVICE (auto|cpu|cuda|cuda:N) to a concrete torch device string."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        return "cuda:0" if cuda_available and cuda_count > 0 else "cpu"
    if not cuda_available or cuda_count == 0:
        raise ConfigError(f"GLMVISION_DEVICE={requested} but no CUDA device is available")
    index = 0 if requested == "cuda" else int(requested.split(":", 1)[1])
    if index >= cuda_count:
        raise ConfigError(f"GLMVISION_DEVICE={requested} but only {cuda_count} CUDA device(s) exist")
    return f"cuda:{index}"


@dataclass(frozen=True)
class DtypeChoice:
    """The precision picked and the reason, for the startup log."""

    dtype: str
    reason: str


def choose_dtype(
    requested: str,
    *,
    device: str,
    bf16_supported: bool = False,
    free_vram_bytes: int | None = None,
    bf16_weight_bytes: int | None = None,
    int8_available: bool = False,
) -> DtypeChoice:
    """Pick the weights' dtype: bf16 if supported, else fp16; fp32 on CPU; int8 if 16-bit won't fit."""
    if requested != "auto":
        if requested in {"bfloat16", "float16", "int8"} and device == "cpu":
            if requested == "bfloat16":
                return DtypeChoice("bfloat16", "requested (bfloat16 on CPU is slow)")
            raise ConfigError(f"GLMVISION_DTYPE={requested} needs a CUDA device")
        if requested == "int8" and not int8_available:
            raise ConfigError("GLMVISION_DTYPE=int8 needs the bitsandbytes package")
        return DtypeChoice(requested, "requested")
    if device == "cpu":
        return DtypeChoice("float32", "CPU")
    half = "bfloat16" if bf16_supported else "float16"
    why = "GPU supports bfloat16" if bf16_supported else "GPU lacks bfloat16"
    if free_vram_bytes is None or bf16_weight_bytes is None:
        return DtypeChoice(half, why)
    needed = bf16_weight_bytes * HEADROOM
    if free_vram_bytes >= needed:
        return DtypeChoice(half, f"{why}; {_gib(needed)} needed, {_gib(free_vram_bytes)} free")
    if int8_available:
        return DtypeChoice(
            "int8", f"{_gib(needed)} needed for 16-bit weights but {_gib(free_vram_bytes)} free"
        )
    return DtypeChoice(
        half,
        f"{_gib(needed)} needed but {_gib(free_vram_bytes)} free and no bitsandbytes: may run out of memory",
    )


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


INDEX = "model.safetensors.index.json"


def _index_total(path: str) -> int | None:
    """Return a safetensors index's metadata.total_size, or None if absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            total = json.load(handle).get("metadata", {}).get("total_size")
    except (OSError, ValueError, AttributeError):  # AttributeError: JSON that is not an index
        return None
    return total if isinstance(total, int) and total > 0 else None


def _checkpoint_bytes(model_dir: str) -> int | None:
    """Size of a local directory's weights: the index's total_size, else its weight files' sizes."""
    index = os.path.join(model_dir, INDEX)
    total = _index_total(index) if os.path.exists(index) else None
    if total:
        return total
    names = os.listdir(model_dir)
    # Checkpoints often ship both formats; transformers loads the safetensors, so count only those.
    weights = [n for n in names if n.endswith(".safetensors")] or [n for n in names if n.endswith(".bin")]
    total = sum(os.path.getsize(os.path.join(model_dir, name)) for name in weights)
    return total or None


def parameter_count(config_dir: str) -> int | None:
    """Count the parameters of the model a directory's config.json describes, or None if unknown."""
    if not os.path.isfile(os.path.join(config_dir, "config.json")):
        return None
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(config_dir)
        # On the meta device nothing is allocated or initialised: exact counts in about a second.
        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("cannot count the parameters of %s/config.json: %s", config_dir, exc)
        return None
    return sum(parameter.numel() for parameter in model.parameters())


def _config_bytes(config_dir: str) -> int | None:
    """16-bit size of the model a config.json describes: two bytes per parameter."""
    count = parameter_count(config_dir)
    return 2 * count if count else None


def cached_hub_file(repo_id: str, filename: str, cache_dir: str | None = None) -> str | None:
    """Path of a hub repo's file in the local Hugging Face cache (revision main), or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
        return None
    # The other non-None answer is a marker saying the hub has no such file.
    return path if isinstance(path, str) else None


def weight_bytes_16bit(source: str, cache_dir: str | None = None) -> int | None:
    """Estimate a checkpoint's weights in 16-bit precision (a local directory or a cached hub id)."""
    # Checkpoints of this model are stored in bf16, so their on-disk size is their 16-bit size.
    if os.path.isdir(source):
        return _checkpoint_bytes(source) or _config_bytes(source)
    if os.path.exists(source):
        return None
    index = cached_hub_file(source, INDEX, cache_dir)
    total = _index_total(index) if index else None
    if total:
        return total
    single = cached_hub_file(source, "model.safetensors", cache_dir)
    if single:
        return os.path.getsize(single)
    # Only part of a snapshot may be cached (an interrupted download): its shards' sizes would
    # undercount, the config's parameter count does not.
    config = cached_hub_file(source, "config.json", cache_dir)
    return _config_bytes(os.path.dirname(config)) if config else None


def bf16_native(capability: tuple[int, int]) -> bool:
    """True when a GPU of this compute capability computes bf16 natively (Ampere, 8.0, and later)."""
    # torch.cuda.is_bf16_supported() also says yes on older GPUs, where bf16 is emulated and slow,
    # and it asks about the current device, not the one the model goes to.
    return tuple(capability) >= (8, 0)


@dataclass(frozen=True)
class CudaFacts:
    """What the dtype decision needs to know about the chosen device."""

    bf16_native: bool = False
    free_bytes: int | None = None


def device_index(device: str) -> int | None:
    """Return the CUDA index of a torch device string (0 for a bare "cuda"), None for the CPU."""
    if not device.startswith("cuda"):
        return None
    # A bare "cuda" would mean torch's current device; resolve_device never returns it, but if it
    # came through anyway it must name a fixed GPU, the one auto picks.
    _, _, number = device.partition(":")
    return int(number) if number else 0


def cuda_facts(device: str) -> CudaFacts:
    """Read the chosen CUDA device's bf16 support and free memory; nothing for the CPU."""
    index = device_index(device)
    if index is None:
        return CudaFacts()
    import torch

    # Both calls get the index explicitly: without one they ask about the current device (cuda:0).
    free, _ = torch.cuda.mem_get_info(index)
    return CudaFacts(bf16_native(torch.cuda.get_device_capability(index)), int(free))


def cuda_uuid(index: int | None) -> str | None:
    """The UUID of CUDA device `index`, which names the same GPU in every process; None if unknown."""
    if index is None:
        return None
    import torch

    try:
        return str(torch.cuda.get_device_properties(index).uuid) or None
    except (AttributeError, RuntimeError, AssertionError):  # old torch, or no such device
        return None
