"""The README stays true: its examples run against real gunicorn, its tables match the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, live_server, model_sees

from glmvision.config import settings_table

README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_example(name: str) -> str:
    """Return the code block that follows `<!-- readme-example: name -->`."""
    match = re.search(rf"<!-- readme-example: {name} -->\s*```\w*\n(.*?)```", README, re.S)
    assert match, f"README example {name!r} not found"
    return match.group(1)


def _documented_default(value: object) -> str:
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if value in ("", []):
        return "(empty)"
    return f"`{value}`"


@pytest.mark.parametrize(("name", "default", "meaning"), settings_table(), ids=lambda v: str(v)[:40])
def test_every_setting_is_documented_with_its_default(name: str, default: object, meaning: str) -> None:
    row = re.search(rf"^\| `{name}` \| (.*?) \| (.*?) \|$", README, re.M)
    assert row, f"{name} missing from the README's configuration table"
    assert row.group(1) == _documented_default(default)
    assert row.group(2) == meaning


def test_every_error_code_is_documented() -> None:
    source = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "glmvision").rglob("*.py"))
    codes = set(re.findall(r'(?:bad_request|unavailable|_unauthorized)\(\s*"(\w+)"', source))
    codes |= set(re.findall(r'APIError\(\s*\d+,\s*"(\w+)"', source))
    framework_codes = re.search(r"_CODES = \{(.*?)\}", source, re.S)
    assert framework_codes
    codes |= set(re.findall(r'\d{3}: "(\w+)"', framework_codes.group(1)))
    assert len(codes) > 15
    documented = set(re.findall(r"^\| \d{3} \| `(\w+)` \|", README, re.M))
    assert codes <= documented, f"undocumented error codes: {sorted(codes - documented)}"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    """The service as the README starts it: no GLMVISION_MODEL, so the demo model."""
    tmp = tmp_path_factory.mktemp("readme")
    with live_server(tmp, {"GLMVISION_DEMO_CACHE": str(tmp / "cache")}, ready_path="/readyz") as server:
        yield server


def test_curl_example_returns_200_json(demo_server) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (CI installs it)")
    script = readme_example("curl").replace("http://127.0.0.1:8080", demo_server.url)
    script = script.replace("curl -sS", "curl -sS --fail-with-body")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr + result.stdout
    body = json.loads(result.stdout)
    assert body["success"] is True and body["model"] == "glm-4.6v-flash-demo"
    assert body["image"]["width"] == 480 and body["image"]["height"] == 270
    assert body["image"]["resized_to"] == model_sees(480, 270)


def test_python_example_runs(demo_server) -> None:
    script = readme_example("python").replace("http://127.0.0.1:8080", demo_server.url)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "'total_tokens'" in result.stdout


def test_demo_model_info_is_reported(demo_server) -> None:
    import requests

    card = requests.get(demo_server.url + "/v1/models", timeout=10).json()["data"][0]
    assert card["demo"] is True and card["ready"] is True
    assert "SERVING THE DEMO MODEL" in demo_server.log()
    assert Path(demo_server.log_path).exists()


def test_openai_client_example_runs_verbatim(demo_server) -> None:
    script = readme_example("openai").replace("http://127.0.0.1:8080", demo_server.url)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # One usage from the plain completion, one from the stream's usage chunk.
    assert result.stdout.count("CompletionUsage(") == 2
