"""The README's test command passes on a machine with only python3 and pip: what needs a program that
.ci/run installs (redis-server) skips there with one reason, rather than erroring."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import NO_REDIS, ROOT

# Every test that starts a real Redis, by module: a fresh machine has no redis-server for any of them.
REDIS_TESTS = [
    "tests/test_cache.py::test_redis_entries_are_shared_by_instances_and_expire",
    "tests/test_cache.py::test_redis_down_is_a_miss_then_the_cache_recovers_on_the_same_port",
    "tests/test_guards.py::test_two_workers_share_counts",
    "tests/test_guards.py::test_redis_down_fails_open_with_a_back_off",
]


def test_redis_tests_skip_with_one_reason_where_redis_is_missing(tmp_path: Path) -> None:
    # Only the interpreter's own folder on PATH: no redis-server, as on a machine with only Python.
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("GLMVISION_")}
    env["PATH"] = str(Path(sys.executable).parent)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *REDIS_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{len(REDIS_TESTS)} skipped" in result.stdout, result.stdout[-3000:]
    assert NO_REDIS in result.stdout
    assert "error" not in result.stdout.splitlines()[-1]


def test_in_ci_a_missing_redis_fails_rather_than_skips(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env.update(PATH=str(Path(sys.executable).parent), CI="true")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", REDIS_TESTS[0]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "CI must run the Redis tests" in result.stdout
