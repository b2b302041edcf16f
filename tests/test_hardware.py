"""Device and dtype decisions, and the checkpoint size estimate they rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import ROOT

from glmvision.backends.local.hardware import (
    GIB,
    CudaFacts,
    DtypeChoice,
    bf16_native,
    choose_dtype,
    cuda_facts,
    cuda_uuid,
    device_index,
    parameter_count,
    resolve_device,
    weight_bytes_16bit,
)
from glmvision.core.config import ConfigError


@pytest.mark.parametrize(
    ("requested", "cuda_available", "cuda_count", "expected"),
    [
        ("auto", True, 1, "cuda:0"),
        ("auto", True, 4, "cuda:0"),
        ("auto", True, 0, "cpu"),
        ("auto", False, 0, "cpu"),
        ("cpu", True, 2, "cpu"),
        ("cpu", False, 0, "cpu"),
        ("cuda", True, 1, "cuda:0"),
        ("cuda:0", True, 1, "cuda:0"),
        ("cuda:1", True, 2, "cuda:1"),
        ("cuda:3", True, 4, "cuda:3"),
    ],
)
def test_resolve_device(requested: str, cuda_available: bool, cuda_count: int, expected: str) -> None:
    """auto prefers the first GPU; explicit devices are kept when they exist."""
    assert resolve_device(requested, cuda_available, cuda_count) == expected


@pytest.mark.parametrize(
    ("requested", "cuda_available", "cuda_count", "message"),
    [
        ("cuda", False, 0, "no CUDA device"),
        ("cuda:0", False, 0, "no CUDA device"),
        ("cuda", True, 0, "no CUDA device"),
        ("cuda:1", True, 1, "only 1 CUDA device"),
        ("cuda:2", True, 2, "only 2 CUDA device"),
    ],
)
def test_resolve_device_errors(requested: str, cuda_available: bool, cuda_count: int, message: str) -> None:
    """Asking for a GPU that is not there is a configuration error naming the setting."""
    with pytest.raises(ConfigError, match=message) as info:
        resolve_device(requested, cuda_available, cuda_count)
    assert f"GLMVISION_DEVICE={requested}" in str(info.value)


GPU = "cuda:0"
WEIGHTS = 20 * GIB


@pytest.mark.parametrize(
    ("requested", "kwargs", "dtype", "reason_part"),
    [
        # auto on CPU is always float32.
        ("auto", {"device": "cpu"}, "float32", "CPU"),
        ("auto", {"device": "cpu", "bf16_supported": True, "int8_available": True}, "float32", "CPU"),
        # auto on GPU: bf16 when supported, fp16 otherwise; unknown sizes stay 16-bit.
        ("auto", {"device": GPU, "bf16_supported": True}, "bfloat16", "supports bfloat16"),
        ("auto", {"device": GPU, "bf16_supported": False}, "float16", "lacks bfloat16"),
        ("auto", {"device": GPU, "bf16_supported": True, "free_vram_bytes": GIB}, "bfloat16", ""),
        (
            "auto",
            {"device": GPU, "bf16_supported": True, "bf16_weight_bytes": WEIGHTS, "int8_available": True},
            "bfloat16",
            "",
        ),
        # Enough memory for 16-bit weights plus headroom.
        (
            "auto",
            {
                "device": GPU,
                "bf16_supported": True,
                "free_vram_bytes": 80 * GIB,
                "bf16_weight_bytes": WEIGHTS,
            },
            "bfloat16",
            "24.0 GiB needed, 80.0 GiB free",
        ),
        (
            "auto",
            {
                "device": GPU,
                "bf16_supported": False,
                "free_vram_bytes": 80 * GIB,
                "bf16_weight_bytes": WEIGHTS,
            },
            "float16",
            "lacks bfloat16",
        ),
        # Exactly 1.2x fits; one byte less does not.
        (
            "auto",
            {"device": GPU, "bf16_supported": True, "free_vram_bytes": 6 * GIB, "bf16_weight_bytes": 5 * GIB},
            "bfloat16",
            "",
        ),
        (
            "auto",
            {
                "device": GPU,
                "bf16_supported": True,
                "free_vram_bytes": 6 * GIB - 1,
                "bf16_weight_bytes": 5 * GIB,
                "int8_available": True,
            },
            "int8",
            "needed for 16-bit weights",
        ),
        # Weights fit but not with headroom: int8 with bitsandbytes, else 16-bit with a warning.
        (
            "auto",
            {
                "device": GPU,
                "bf16_supported": True,
                "free_vram_bytes": 22 * GIB,
                "bf16_weight_bytes": WEIGHTS,
                "int8_available": True,
            },
            "int8",
            "24.0 GiB needed for 16-bit weights but 22.0 GiB free",
        ),
        (
            "auto",
            {
                "device": GPU,
                "bf16_supported": True,
                "free_vram_bytes": 22 * GIB,
                "bf16_weight_bytes": WEIGHTS,
            },
            "bfloat16",
            "may run out of memory",
        ),
        (
            "auto",
            {
                "device": GPU,
                "bf16_supported": False,
                "free_vram_bytes": 8 * GIB,
                "bf16_weight_bytes": WEIGHTS,
            },
            "float16",
            "no bitsandbytes",
        ),
        (
            "auto",
            {
                "device": GPU,
                "bf16_supported": False,
                "free_vram_bytes": 0,
                "bf16_weight_bytes": WEIGHTS,
                "int8_available": True,
            },
            "int8",
            "0.0 GiB free",
        ),
        # Explicit requests are honoured, even where auto would choose otherwise.
        ("float32", {"device": GPU, "bf16_supported": True}, "float32", "requested"),
        ("float32", {"device": "cpu"}, "float32", "requested"),
        ("float16", {"device": GPU, "bf16_supported": True}, "float16", "requested"),
        ("bfloat16", {"device": GPU, "bf16_supported": False}, "bfloat16", "requested"),
        (
            "bfloat16",
            {
                "device": GPU,
                "bf16_supported": True,
                "free_vram_bytes": GIB,
                "bf16_weight_bytes": WEIGHTS,
                "int8_available": True,
            },
            "bfloat16",
            "requested",
        ),
        ("int8", {"device": GPU, "int8_available": True}, "int8", "requested"),
        (
            "int8",
            {"device": "cuda:1", "int8_available": True, "free_vram_bytes": 80 * GIB},
            "int8",
            "requested",
        ),
        ("bfloat16", {"device": "cpu"}, "bfloat16", "slow"),
    ],
)
def test_choose_dtype(requested: str, kwargs: dict[str, Any], dtype: str, reason_part: str) -> None:
    """The dtype follows device, bf16 support, free VRAM and bitsandbytes, with a reason."""
    choice = choose_dtype(requested, **kwargs)
    assert isinstance(choice, DtypeChoice)
    assert choice.dtype == dtype
    assert reason_part in choice.reason
    assert choice.reason


@pytest.mark.parametrize(
    ("requested", "kwargs", "message"),
    [
        ("int8", {"device": "cpu", "int8_available": True}, "GLMVISION_DTYPE=int8 needs a CUDA device"),
        ("float16", {"device": "cpu"}, "GLMVISION_DTYPE=float16 needs a CUDA device"),
        ("int8", {"device": GPU, "int8_available": False}, "GLMVISION_DTYPE=int8 needs the bitsandbytes"),
        ("int8", {"device": GPU}, "bitsandbytes"),
    ],
)
def test_choose_dtype_errors(requested: str, kwargs: dict[str, Any], message: str) -> None:
    """Requests the hardware cannot honour are configuration errors."""
    with pytest.raises(ConfigError, match=message):
        choose_dtype(requested, **kwargs)


def _write(directory: Path, files: dict[str, int | str]) -> None:
    """Create files: an int is a size in bytes, a str is the content."""
    for name, content in files.items():
        path = directory / name
        if isinstance(content, int):
            path.write_bytes(b"\0" * content)
        else:
            path.write_text(content, encoding="utf-8")


INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({INDEX: json.dumps({"metadata": {"total_size": 123_456}}), "a.safetensors": 10}, 123_456),
        ({INDEX: json.dumps({"metadata": {}}), "a.safetensors": 100, "b.safetensors": 250}, 350),
        ({INDEX: json.dumps({"weight_map": {}}), "a.safetensors": 100}, 100),
        ({INDEX: json.dumps({"metadata": {"total_size": 0}}), "a.safetensors": 7}, 7),
        ({INDEX: json.dumps({"metadata": {"total_size": "big"}}), "a.safetensors": 7}, 7),
        ({INDEX: "{not json", "a.safetensors": 9}, 9),
        ({INDEX: json.dumps([1, 2]), "a.safetensors": 9}, 9),
        ({INDEX: json.dumps({"metadata": None}), "a.safetensors": 9}, 9),
        ({"model.safetensors": 300, "config.json": "{}", "tokenizer.json": 5000}, 300),
        ({"model-1.safetensors": 300, "model-2.safetensors": 200, "README.md": 40}, 500),
        ({"pytorch_model.bin": 80}, 80),
        # Repos that ship both formats: transformers loads the safetensors, so only they count.
        ({"model.safetensors": 300, "pytorch_model.bin": 600}, 300),
        ({"config.json": "{}"}, None),
        # A config.json of a model that is not image-text-to-text cannot be counted either.
        ({"config.json": json.dumps({"model_type": "bert"})}, None),
        ({}, None),
    ],
)
def test_weight_bytes_16bit(tmp_path: Path, files: dict[str, int | str], expected: int | None) -> None:
    """The index's total_size wins; else the weight files' sizes; None when there are none."""
    _write(tmp_path, files)
    assert weight_bytes_16bit(str(tmp_path)) == expected


@pytest.mark.parametrize("name", ["missing", "zai-org/GLM-4.6V-Flash"])
def test_weight_bytes_16bit_without_a_local_directory(tmp_path: Path, name: str) -> None:
    """A missing directory has no known size, even when its path ends like a hub id."""
    assert weight_bytes_16bit(str(tmp_path / name)) is None


REPO = "zai-org/GLM-4.6V-Flash"
# GLM-4.6V-Flash: 10.29 B parameters in bf16.
REAL_16BIT = 19.2 * GIB


@pytest.fixture(scope="module")
def glm_config_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    """config.json as transformers writes it for Glm4vConfig(), whose defaults are GLM-4.6V-Flash's."""
    from transformers import Glm4vConfig

    directory = tmp_path_factory.mktemp("glm4v-config")
    Glm4vConfig().save_pretrained(directory)
    return (directory / "config.json").read_text(encoding="utf-8")


def _hub_snapshot(cache: Path, repo_id: str, files: dict[str, int | str], revision: str = "0" * 40) -> None:
    """Lay files out as huggingface_hub caches them: blobs, a snapshot of symlinks, refs/main."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    blobs, snapshot = repo / "blobs", repo / "snapshots" / revision
    for directory in (blobs, snapshot, repo / "refs"):
        directory.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    for number, (name, content) in enumerate(files.items()):
        _write(blobs, {f"blob{number}": content})
        (snapshot / name).symlink_to(blobs / f"blob{number}")


SHARD = "model-00001-of-00002.safetensors"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({INDEX: json.dumps({"metadata": {"total_size": 123_456}}), SHARD: 10}, 123_456),
        ({INDEX: json.dumps({"metadata": {"total_size": 123_456}}), "config.json": "{}"}, 123_456),
        ({"model.safetensors": 300, "config.json": "{}"}, 300),
        # Shards without a total may be an interrupted download: their sizes would undercount.
        ({INDEX: json.dumps({"weight_map": {}}), SHARD: 100}, None),
        ({"tokenizer.json": 5000}, None),
    ],
)
def test_weight_bytes_16bit_of_a_cached_hub_id(
    tmp_path: Path, files: dict[str, int | str], expected: int | None
) -> None:
    """A hub id's size comes from its cached index's total_size, else its cached single weights file."""
    _hub_snapshot(tmp_path, REPO, files)
    assert weight_bytes_16bit(REPO, cache_dir=str(tmp_path)) == expected


def test_weight_bytes_16bit_of_a_hub_id_not_cached(tmp_path: Path) -> None:
    """Another repo's snapshot, or an empty cache, says nothing about this one (and nothing is fetched)."""
    assert weight_bytes_16bit(REPO, cache_dir=str(tmp_path)) is None
    _hub_snapshot(tmp_path, "zai-org/GLM-4.5V", {INDEX: json.dumps({"metadata": {"total_size": 5}})})
    assert weight_bytes_16bit(REPO, cache_dir=str(tmp_path)) is None


@pytest.mark.parametrize("where", ["hub cache", "local directory"])
def test_weight_bytes_16bit_from_the_config_alone(tmp_path: Path, glm_config_json: str, where: str) -> None:
    """With no weights to measure, the config's parameter count x 2 bytes is the real model's size."""
    if where == "hub cache":
        _hub_snapshot(tmp_path, REPO, {"config.json": glm_config_json, SHARD: 100})
        estimate = weight_bytes_16bit(REPO, cache_dir=str(tmp_path))
    else:
        _write(tmp_path, {"config.json": glm_config_json})
        estimate = weight_bytes_16bit(str(tmp_path))
    assert estimate is not None
    assert abs(estimate - REAL_16BIT) < 0.05 * REAL_16BIT


def test_parameter_count_of_the_default_config(tmp_path: Path, glm_config_json: str) -> None:
    """Glm4vConfig() describes GLM-4.6V-Flash: about 10.29 B parameters."""
    _write(tmp_path, {"config.json": glm_config_json})
    count = parameter_count(str(tmp_path))
    assert count is not None
    assert 10.2e9 < count < 10.4e9


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_weight_bytes_16bit_looks_where_huggingface_hub_caches(tmp_path: Path, variable: str) -> None:
    """Without cache_dir, huggingface_hub's own cache is searched, so its environment variables count."""
    cache = tmp_path if variable == "HF_HUB_CACHE" else tmp_path / "hub"
    _hub_snapshot(cache, REPO, {INDEX: json.dumps({"metadata": {"total_size": 987_654}})})
    code = (
        "from glmvision.backends.local.hardware import weight_bytes_16bit; "
        f"print(weight_bytes_16bit({REPO!r}))"
    )
    # huggingface_hub reads its cache location once, at import: hence a fresh interpreter.
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_CACHE", "HF_HOME"}}
    env[variable] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "987654"


def test_weight_bytes_16bit_of_a_file_is_unknown(tmp_path: Path) -> None:
    """A path to a single file is not a checkpoint directory."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 10)
    assert weight_bytes_16bit(str(path)) is None


@pytest.mark.parametrize(
    ("configured", "parameters", "threads"),
    [(0, 225_000, 1), (0, 10_290_000_000, 0), (4, 225_000, 4), (3, 10_290_000_000, 3)],
)
def test_torch_threads(configured: int, parameters: int, threads: int) -> None:
    from glmvision.backends.local.loading import torch_threads

    assert torch_threads(configured, parameters) == threads


@pytest.mark.parametrize(
    ("capability", "native"),
    [
        ((6, 1), False),
        ((7, 0), False),
        ((7, 5), False),
        ((8, 0), True),
        ((8, 6), True),
        ((9, 0), True),
        ((12, 0), True),
    ],
)
def test_bf16_native(capability: tuple[int, int], native: bool) -> None:
    """Only Ampere (8.0) and later compute bf16 natively; Turing (7.5) and Pascal (6.1) emulate it."""
    assert bf16_native(capability) is native


@pytest.mark.parametrize(("device", "index"), [("cpu", None), ("cuda", 0), ("cuda:0", 0), ("cuda:3", 3)])
def test_device_index(device: str, index: int | None) -> None:
    assert device_index(device) == index


class _RecordingCuda:
    """Stand-ins for torch.cuda's per-device queries that record which device was asked."""

    def __init__(self, capabilities: dict[int, tuple[int, int]], free: dict[int, int]) -> None:
        self.capabilities = capabilities
        self.free = free
        self.asked: list[tuple[str, object]] = []

    def get_device_capability(self, device: object = None) -> tuple[int, int]:
        self.asked.append(("capability", device))
        return self.capabilities[device]  # type: ignore[index]

    def mem_get_info(self, device: object = None) -> tuple[int, int]:
        self.asked.append(("mem_get_info", device))
        return self.free[device], 80 * GIB  # type: ignore[index]

    def current_device(self) -> int:
        raise AssertionError("cuda_facts must not fall back to the current device")


@pytest.mark.parametrize(
    ("device", "index", "native", "free"), [("cuda:0", 0, False, 10), ("cuda:2", 2, True, 30)]
)
def test_cuda_facts_ask_about_the_chosen_device(
    monkeypatch: pytest.MonkeyPatch, device: str, index: int, native: bool, free: int
) -> None:
    """cuda:N's capability and free memory come from device N, never from the current device (0)."""
    import torch

    # Device 0 (the current device) is a Turing card with 10 GiB free, device 2 a Hopper with 30 GiB.
    fake = _RecordingCuda({0: (7, 5), 1: (7, 5), 2: (9, 0)}, {0: 10 * GIB, 1: 20 * GIB, 2: 30 * GIB})
    for name in ("get_device_capability", "mem_get_info", "current_device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    facts = cuda_facts(device)
    assert facts == CudaFacts(bf16_native=native, free_bytes=free * GIB)
    assert sorted(fake.asked) == [("capability", index), ("mem_get_info", index)]


def test_cuda_facts_on_cpu_ask_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    fake = _RecordingCuda({}, {})
    monkeypatch.setattr(torch.cuda, "mem_get_info", fake.mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_device_capability", fake.get_device_capability)
    assert cuda_facts("cpu") == CudaFacts()
    assert fake.asked == []


def test_cuda_uuid_asks_about_the_chosen_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is named by the UUID of cuda:N itself; a device torch cannot describe has none."""
    import torch

    asked: list[object] = []

    def properties(device: object) -> SimpleNamespace:
        asked.append(device)
        if device == 9:
            raise RuntimeError("invalid device ordinal")
        return SimpleNamespace(uuid=f"uuid-of-{device}")

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    assert cuda_uuid(3) == "uuid-of-3"
    assert cuda_uuid(9) is None
    assert cuda_uuid(None) is None
    assert asked == [3, 9]
