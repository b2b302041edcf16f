"""Which GPU each gunicorn worker gets: pure decisions the master can make without importing torch.

The gunicorn master (deploy/gunicorn.conf.py) counts the visible GPUs once, without touching CUDA,
picks one for every worker it forks and hands it to the worker as GLMVISION_DEVICE=cuda:N.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

PROC_GPUS = "/proc/driver/nvidia/gpus"


def _leading_int(entry: str) -> int:
    """Parse an entry the way CUDA's strtoul does ("1gpu" is 1); -1 when it does not start with digits."""
    digits = ""
    for char in entry:
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else -1


def _count_visible(value: str) -> int:
    """Count the devices a CUDA_VISIBLE_DEVICES value makes visible (see visible_gpu_count)."""
    entries = [entry.strip() for entry in value.split(",")]
    prefix = next((p for p in ("GPU-", "MIG-") if entries[0].startswith(p)), "")
    seen: list[str | int] = []
    for entry in entries:
        key: str | int = entry if prefix else _leading_int(entry)
        if (prefix and not entry.startswith(prefix)) or key == -1:
            break  # the first invalid entry ends the list: CUDA ignores it and everything after it
        if key in seen:
            return 0  # a repeated device makes CUDA see none at all
        seen.append(key)
    if prefix == "MIG-":
        return min(len(seen), 1)  # one CUDA process enumerates at most one MIG device
    return len(seen)


def visible_gpu_count(environ: Mapping[str, str] | None = None, proc_dir: str = PROC_GPUS) -> int:
    """Count the GPUs CUDA would show this process, from CUDA_VISIBLE_DEVICES or the driver's /proc."""
    # CUDA_VISIBLE_DEVICES is read as CUDA reads it (and torch.cuda._parse_visible_devices mirrors):
    # comma-separated indices ("0,2"), GPU UUIDs ("GPU-8a1f...") or MIG ids ("MIG-..."), the kind set by
    # the first entry. Counting stops at the first invalid entry (not a number, a negative number, the
    # other kind), so "", "-1" and "NoDevFiles" mean no GPU; a repeated entry also means none. Indices
    # are not checked against the installed GPUs: a worker told cuda:N for a GPU that does not exist
    # fails to load with a clear error rather than silently sharing another worker's GPU.
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return _count_visible(value)
    try:
        # One directory per GPU the driver knows, named by PCI bus id.
        return sum(1 for entry in os.scandir(proc_dir) if entry.is_dir())
    except OSError:
        return 0


def pick_gpu(in_use: Iterable[int], count: int) -> int | None:
    """Return the lowest free GPU index, else the lowest of the least-loaded; None without GPUs."""
    # Workers only double up on a GPU when there are more workers than GPUs; then they spread evenly.
    if count <= 0:
        return None
    load = [0] * count
    for gpu in in_use:
        if 0 <= gpu < count:
            load[gpu] += 1
    return min(range(count), key=lambda gpu: (load[gpu], gpu))


def worker_device(gpu: int | None, configured: str) -> str | None:
    """Return the GLMVISION_DEVICE a worker given `gpu` should use, or None to leave `configured` as is."""
    if gpu is None or configured not in {"auto", "cuda"}:
        return None  # no GPU, or the operator chose cpu or a cuda:N for every worker
    return f"cuda:{gpu}"


def engine_devices(engines: int, gpu_count: int, configured: str) -> list[str]:
    """The GLMVISION_DEVICE of each engine process ("" leaves `configured` as is): `engines` of them,
    0 meaning one per GPU (one on CPU, or on the one device the operator named), given to the GPUs in turn."""
    if configured not in {"auto", "cuda"}:
        gpu_count = 0  # cpu or one cuda:N: every engine uses it
    count = engines or max(1, gpu_count)
    gpus = [index % gpu_count if gpu_count else None for index in range(count)]
    return [worker_device(gpu, configured) or "" for gpu in gpus]
