"""Loading the model: where it comes from, its name, and which device and dtype it runs in."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmvision.backends.local.compiler import GrammarLimits
from glmvision.backends.local.demo import DEMO_MARKER, ensure_demo_model
from glmvision.backends.local.runtime import LoadedModel
from glmvision.core.backend import preparing_slots
from glmvision.core.config import ConfigError, Settings

log = logging.getLogger("glmvision")

DEMO_MODEL_ID = "glm-4.6v-flash-demo"
TINY_MODEL_PARAMETERS = 100_000_000


def is_demo(source: str) -> bool:
    """True for the built-in demo model: no source configured, or a directory the builder wrote."""
    return not source or os.path.exists(os.path.join(source, DEMO_MARKER))


def looks_like_path(source: str) -> bool:
    """True when GLMVISION_MODEL names a directory rather than a hub id (`org/name`): one that exists
    (`models/glm` too, as transformers would load it), or one written as a path."""
    if source and os.path.exists(os.path.expanduser(source)):
        return True
    return source.startswith(("/", "./", "../", "~")) or os.sep + os.sep in source or source.count("/") > 1


def check_source(source: str) -> None:
    """Refuse at start-up a model path that does not exist, or whose weights are missing or cut short
    (a hub id is checked when it loads)."""
    if not source or not looks_like_path(source):
        return
    directory = Path(os.path.expanduser(source))
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"GLMVISION_MODEL={source}: not a directory (name the model's directory)")
    if not directory.is_dir():
        # A relative path is read from the server's working directory, which may not be the caller's.
        where = "" if directory.is_absolute() else f" (looked in {directory.absolute()})"
        raise ConfigError(f"GLMVISION_MODEL={source}: directory not found{where}")
    problems = weight_problems(directory)
    if problems:
        raise ConfigError(f"GLMVISION_MODEL={source}: " + "; ".join(problems))


INDEX = "model.safetensors.index.json"


def weight_problems(directory: Path) -> list[str]:
    """What is wrong with a local model's safetensors: shards the index names that are absent or
    shorter than their own header says (a download cut short). Reads headers only. A directory with
    no weights at all is left to loading (503 model_unavailable, retried), as before."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return [f"{INDEX} is not a safetensors index"]
    else:
        shards = sorted(path.name for path in directory.glob("*.safetensors"))
    missing = [name for name in shards if not (directory / name).is_file()]
    problems = [f"missing {', '.join(missing)} ({len(missing)} of {len(shards)} shards)"] if missing else []
    cut = [name for name in shards if name not in missing and not _whole_safetensors(directory / name)]
    if cut:
        problems.append(f"truncated or corrupt: {', '.join(cut)}")
    return problems


def _whole_safetensors(path: Path) -> bool:
    """True when the file is as long as its header says: 8 bytes of header size, the header, the data."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                return False
            length = int.from_bytes(raw, "little")
            size = path.stat().st_size
            if length > size - 8 or length > 100 << 20:
                return False
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return size >= 8 + length + max(ends, default=0)


def model_id_for(source: str, configured: str) -> str:
    """Return the model name clients see, the same before and after loading."""
    if configured:
        return configured
    if is_demo(source):
        return DEMO_MODEL_ID
    return os.path.basename(os.path.normpath(source)) if os.path.isdir(source) else source


def demo_cache_dir(settings: Settings) -> str:
    """Where the demo model is built when no weights are configured."""
    if settings.demo_cache:
        return settings.demo_cache
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "glmvision")


def torch_threads(configured: int, parameters: int) -> int:
    """Threads to give torch (0: leave its default): tiny models run fastest on one."""
    if configured:
        return configured
    # Intra-op threads only pay off for big matrices; for a tiny model they are synchronisation
    # overhead that also takes a core from the request threads' preprocessing.
    return 1 if parameters < TINY_MODEL_PARAMETERS else 0


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _load_kwargs(dtype: str, device: str) -> dict[str, Any]:
    """from_pretrained's arguments for the chosen dtype and device."""
    import torch
    import transformers

    kwargs: dict[str, Any] = {}
    if dtype == "int8":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.float16
    else:
        kwargs["dtype"] = getattr(torch, dtype)
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    return kwargs


def model_revision(source: str, model: Any) -> str:
    """What identifies these weights (for the response cache): the hub commit, else files' sizes and times."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    digest = hashlib.sha256()
    directory = Path(source)
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class ModelShell:
    """The model's configs without its weights: all a worker whose engine runs elsewhere reads of it."""

    config: Any
    generation_config: Any
    weights: bool = False  # what /readyz reports: this process holds no weights


def load_processor(settings: Settings, device: str = "engine") -> LoadedModel:
    """The processor and the model's configs only (GLMVISION_ENGINE=process: the engine holds the weights)."""
    import torch
    import transformers

    started = time.perf_counter()
    # The processor's tensor work runs in each request thread: with torch's intra-op pool each such
    # thread would grow an OpenMP team of its own (gthread's 88 threads, a core's worth each). The
    # workers' parallelism is their request threads; the engine's matrices are where threads pay.
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    source = (
        os.path.expanduser(settings.model)
        if settings.model
        else str(ensure_demo_model(demo_cache_dir(settings)))
    )
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        try:
            generation = transformers.GenerationConfig.from_pretrained(source)
        except OSError:
            generation = transformers.GenerationConfig.from_model_config(config)
        processor = transformers.AutoProcessor.from_pretrained(source)
    except OSError as exc:
        raise RuntimeError(f"cannot load the processor from {source!r}: {exc}") from exc
    processor.tokenizer.padding_side = "left"
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", "") or "").split(".")[-1]
    shell = ModelShell(config, generation)
    return LoadedModel(
        processor=processor,
        model=shell,
        model_id=model_id_for(source, settings.model_id),
        device=device,
        dtype=dtype,
        demo=is_demo(source),
        load_seconds=time.perf_counter() - started,
        processor_copies=preparing_slots(settings.max_batch_size),
        encoder_cache_mb=settings.encoder_cache_mb,
        revision=model_revision(source, shell),
        grammar_limits=GrammarLimits(
            settings.grammar_timeout, settings.grammar_workers, int(settings.grammar_cache_mb * 2**20)
        ),
    )


def load_model(settings: Settings) -> LoadedModel:
    """Load processor and model as configured: real weights, or the demo model when none are set."""
    import torch
    import transformers

    from glmvision.backends.local.gpulock import gpu_load_lock
    from glmvision.backends.local.hardware import (
        choose_dtype,
        cuda_facts,
        cuda_uuid,
        device_index,
        resolve_device,
        weight_bytes_16bit,
    )

    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    source = (
        os.path.expanduser(settings.model)
        if settings.model
        else str(ensure_demo_model(demo_cache_dir(settings)))
    )
    demo = is_demo(source)
    if demo:
        log.warning(
            "SERVING THE DEMO MODEL (%s): random weights, answers are meaningless. "
            "Set GLMVISION_MODEL to real GLM-4.6V-Flash weights.",
            source,
        )
    cuda = torch.cuda.is_available()
    device = resolve_device(settings.device, cuda, torch.cuda.device_count() if cuda else 0)
    index = device_index(device)
    # Only auto on a GPU uses the size; it is worked out before the lock since it may take a second.
    weight_bytes = weight_bytes_16bit(source) if index is not None and settings.dtype == "auto" else None
    try:
        # From the free-memory reading until the weights are on the GPU, no other worker may read
        # that GPU's free memory: it would count on memory this worker is about to take.
        with gpu_load_lock(index, cuda_uuid(index)):
            facts = cuda_facts(device)
            choice = choose_dtype(
                settings.dtype,
                device=device,
                bf16_supported=facts.bf16_native,
                free_vram_bytes=facts.free_bytes,
                bf16_weight_bytes=weight_bytes,
                int8_available=_has_bitsandbytes(),
            )
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                source, **_load_kwargs(choice.dtype, device)
            )
        processor = transformers.AutoProcessor.from_pretrained(source)
    except OSError as exc:
        raise RuntimeError(f"cannot load model from {source!r}: {exc}") from exc
    model.eval()
    threads = torch_threads(settings.torch_threads, sum(p.numel() for p in model.parameters()))
    if threads:
        torch.set_num_threads(threads)
    processor.tokenizer.padding_side = "left"
    model_id = model_id_for(source, settings.model_id)
    revision = model_revision(source, model)
    adapters = None
    if settings.lora_adapters:
        from glmvision.backends.local.adapters import adapters_revision, load_adapters

        adapters = load_adapters(model, settings.lora_adapters)
        revision += "+lora:" + adapters_revision(settings.lora_adapters)
    loaded = LoadedModel(
        processor=processor,
        model=model,
        model_id=model_id,
        device=device,
        dtype=choice.dtype,
        demo=demo,
        load_seconds=time.perf_counter() - started,
        processor_copies=preparing_slots(settings.max_batch_size),  # one per request being prepared
        encoder_cache_mb=settings.encoder_cache_mb,
        revision=revision,
        adapters=adapters,
        grammar_limits=GrammarLimits(
            settings.grammar_timeout, settings.grammar_workers, int(settings.grammar_cache_mb * 2**20)
        ),
    )
    log.info(
        "model loaded: id=%s device=%s dtype=%s (%s) torch threads=%d in %.2fs pid=%d",
        model_id,
        device,
        choice.dtype,
        choice.reason,
        torch.get_num_threads(),
        loaded.load_seconds,
        os.getpid(),
    )
    return loaded
