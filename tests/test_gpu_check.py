"""The GPU check (bench/gpu_check.sh) runs end to end on the CPU with the tiny config, so it cannot rot
while no GPU is at hand; its summary has every figure, and the fp32 identity checks hold."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"

# Lines that must read as numbers (n/a is not allowed for them in the CPU smoke run).
NUMBERS = (
    "parameters",
    "weights_gib",
    "load_s",
    "decode_tokens",
    "decode_tok_s",
    "decode_limit_tok_s",
    "decode_bandwidth_ratio",
    "throughput_clients",
    "throughput_largest_batch",
    "throughput_tok_s",
    "mixed_long_prompt_tokens",
    "mixed_short_alone_tok_s",
    "mixed_short_during_tok_s",
    "mixed_load_ratio",
    "mixed_long_ttft_ms",
    "mixed_step_ms",
    "mixed_longest_gap_ms",
    "identity_batched_prefills",
    "followup_prompt_tokens",
    "followup_shared_prefix_tokens",
    "followup_ttft_ms_caches_off",
    "followup_ttft_ms_caches_on",
    "followup_engine_ttft_ms_caches_off",
    "followup_engine_ttft_ms_caches_on",
    "followup_speedup",
    "followup_cached_tokens_caches_off",
    "followup_cached_tokens_caches_on",
    "kv_bytes_per_token",
    "kv_budget_tokens",
    "kv_budget_gib",
    "total_s",
)
Smoke = tuple[subprocess.CompletedProcess[str], dict[str, str]]
PHASES = ("warm_up", "decode", "throughput", "mixed_load", "identity", "followup")


def _load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke() -> Smoke:
    """One CPU smoke run of the script as a person would start it, and its summary lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env.update(PYTHON=sys.executable, GPU_CHECK_TIMEOUT="240", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-smoke", "--bandwidth-gbs", "50"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stdout.splitlines()
    assert "== gpu_check summary ==" in lines, done.stdout[-3000:] + done.stderr[-3000:]
    block = lines[lines.index("== gpu_check summary ==") + 1 : lines.index("== end ==")]
    summary = dict(line.split(": ", 1) for line in block)
    return done, summary


def test_the_cpu_smoke_run_ends_well_with_every_phase(smoke: Smoke) -> None:
    done, summary = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for phase in PHASES:
        assert summary[f"phase_{phase}"].startswith("ok"), (phase, summary[f"phase_{phase}"])
    assert summary["phases_ok"] == f"{len(PHASES)}/{len(PHASES)}"
    assert (summary["mode"], summary["device"], summary["dtype"]) == ("cpu-smoke", "cpu", "float32")


def test_every_figure_is_a_sane_number(smoke: Smoke) -> None:
    _, summary = smoke
    values = {name: float(summary[name]) for name in NUMBERS}  # each present, each a number
    for name, value in values.items():
        assert value >= 0, (name, value)
    for name in ("decode_tok_s", "decode_limit_tok_s", "decode_bandwidth_ratio", "throughput_tok_s"):
        assert values[name] > 0, name
    assert values["decode_tokens"] == 16
    assert values["decode_bandwidth_ratio"] == pytest.approx(
        values["decode_tok_s"] / values["decode_limit_tok_s"], rel=0.01, abs=0.001
    )
    assert values["throughput_clients"] == 8
    assert 2 <= values["throughput_largest_batch"] <= 8  # the clients shared decode steps
    assert values["mixed_short_alone_tok_s"] > 0
    # The follow-up re-sends the first turn: its image and question are a prefix the caches can reuse.
    assert 0 < values["followup_shared_prefix_tokens"] < values["followup_prompt_tokens"]
    # With the caches on, turn 2 reuses the KV of what it shares with turn 1; with them off, nothing.
    assert values["followup_cached_tokens_caches_off"] == 0
    assert 0 < values["followup_cached_tokens_caches_on"] <= values["followup_shared_prefix_tokens"]
    assert values["mixed_long_prompt_tokens"] > 200  # the image's visual tokens are in it
    # The demo model: 2 layers x 1 KV head x head dim 32, keys and values, fp32.
    assert values["kv_bytes_per_token"] == 2 * 2 * 1 * 32 * 4
    assert values["kv_budget_tokens"] > 0
    assert summary["kv_budget_source"] == "setting"  # no GPU memory to cap it
    assert summary["peak_allocated_gib"] == "n/a"


def test_fp32_rows_match_batched_or_solo_and_with_caches_or_without(
    smoke: Smoke,
) -> None:
    _, summary = smoke
    matching, rows = (int(part) for part in summary["identity_rows_matching"].split("/"))
    assert rows == 4 and matching == rows, summary["identity_first_divergence"]
    assert summary["identity_first_divergence"] == "none"
    assert int(summary["identity_batched_prefills"]) >= 1
    assert summary["followup_cache_identity"] == "match"


def test_bandwidth_comes_from_the_table_by_gpu_name_or_from_the_flag() -> None:
    check = _load_module()
    assert check.bandwidth_for("NVIDIA H100 80GB HBM3", None) == 3350
    assert check.bandwidth_for("NVIDIA H100 PCIe", None) == 2000
    assert check.bandwidth_for("NVIDIA H200", None) == 4800
    assert check.bandwidth_for("NVIDIA A100-SXM4-80GB", None) == 2000
    assert check.bandwidth_for("NVIDIA A100 80GB PCIe", None) == 2000
    assert check.bandwidth_for("NVIDIA L4", None) is None
    assert check.bandwidth_for("NVIDIA L4", 300.0) == 300.0
    assert check.bandwidth_for("NVIDIA H100 80GB HBM3", 3000.0) == 3000.0


def test_first_difference_names_where_two_answers_part() -> None:
    check = _load_module()
    assert check.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert check.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert check.first_difference([1, 2], [1, 2, 3]) == 2


def test_without_a_gpu_the_real_run_says_so_and_exits_2() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env.update(PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "--cpu-smoke" in done.stderr
