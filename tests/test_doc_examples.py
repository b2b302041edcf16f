"""The documented examples stay true: every runnable block in the README and docs/*.md runs against real
gunicorn (the finetune walk-through and its LoRA example run in tests/test_lora.py)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from helpers import DOC_PAGES, ROOT, doc_example, live_server, model_sees

import glmvision

EXAMPLE_MARK = re.compile(r"<!-- example: ([\w-]+) -->")
# Each documented example and the test that runs it: adding a marked block without a test fails here.
RUN_BY = {
    "curl": "test_curl_example_returns_200_json",
    "run-python": "run_python_example",
    "python": "test_python_example_runs",
    "metrics": "test_metrics_example_shows_the_requests_counted",
    "openai": "test_openai_client_example_runs_verbatim",
    "responses": "test_responses_example_runs_verbatim",
    "openai-tools": "test_tool_calling_example_runs_verbatim",
    "structured": "test_structured_outputs_example_runs_verbatim",
    "cli-ask": "test_cli_ask_example_streams_an_answer",
    "cli-batch": "test_cli_batch_example_writes_a_line_per_image",
    "finetune": "test_lora.py",
    "lora-openai": "test_lora.py",
}


def test_every_marked_example_is_run_by_a_test() -> None:
    marked = {name for page in DOC_PAGES for name in EXAMPLE_MARK.findall(page.read_text(encoding="utf-8"))}
    assert marked == set(RUN_BY)
    tests = (ROOT / "tests" / "test_doc_examples.py").read_text(encoding="utf-8")
    lora = (ROOT / "tests" / "test_lora.py").read_text(encoding="utf-8")
    for name, runner in RUN_BY.items():
        assert f'"{name}"' in (lora if runner == "test_lora.py" else tests), f"no test runs example {name!r}"


def test_the_readme_is_a_front_door() -> None:
    """Short, the first request early, and the set-up commands CI runs (.ci/run runs ./scripts/test.sh)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = readme.splitlines()
    assert len(lines) <= 200
    assert lines.index("<!-- example: curl -->") < 80 and lines.index("<!-- example: python -->") < 80
    setup = re.search(r"## Set-up: two commands\n.*?```bash\n(.*?)```", readme, re.S)
    assert setup, "the README's set-up block is missing"
    commands = [line.split()[0] for line in setup.group(1).splitlines()]
    assert commands == ["./scripts/serve.sh", "./scripts/test.sh"]
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip().endswith("./scripts/test.sh")


def test_the_changelog_top_entry_is_the_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    # Keep a Changelog's "Unreleased" section gathers changes until the next version is named.
    versions = [v for v in re.findall(r"^## \[([^\]]+)\]", changelog, re.M) if v != "Unreleased"]
    assert versions, "CHANGELOG.md has no version entry"
    assert versions[0] == glmvision.__version__, "CHANGELOG.md's newest entry must be glmvision.__version__"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    """The service as the docs start it: no GLMVISION_MODEL, so the demo model."""
    tmp = tmp_path_factory.mktemp("docs")
    with live_server(tmp, {"GLMVISION_DEMO_CACHE": str(tmp / "cache")}, ready_path="/readyz") as server:
        yield server


def test_curl_example_returns_200_json(demo_server) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (CI installs it)")
    script = doc_example("curl").replace("http://127.0.0.1:8080", demo_server.url)
    script = script.replace("curl -sS", "curl -sS --fail-with-body")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr + result.stdout
    body = json.loads(result.stdout)
    assert body["success"] is True and body["model"] == "glm-4.6v-flash-demo"
    assert body["image"]["width"] == 480 and body["image"]["height"] == 270
    assert body["image"]["resized_to"] == model_sees(480, 270)


def test_metrics_example_shows_the_requests_counted(demo_server) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (CI installs it)")
    test_curl_example_returns_200_json(demo_server)  # at least one answered request to count
    script = doc_example("metrics").replace("http://127.0.0.1:8080", demo_server.url)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr + result.stdout
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("glmvision_requests_total{") for line in lines)
    ok = [line for line in lines if 'route="/v1/chat/vision"' in line and 'status="200"' in line]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1


def run_python_example(
    name: str, url: str, tmp_path: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a documented Python example the way the docs say: saved as a file, with its run command."""
    example = tmp_path / "example.py"
    example.write_text(doc_example(name).replace("http://127.0.0.1:8080", url), encoding="utf-8")
    command = doc_example("run-python").strip()
    assert command == ".venv/bin/python /tmp/example.py"
    assert (ROOT / ".venv/bin/python").exists(), "the docs run the examples with .venv/bin/python"
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command.replace("/tmp/example.py", str(example))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _requirement_names(path: Path) -> set[str]:
    """Distribution names a requirements file installs, following `-r` includes."""
    names: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            names |= _requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(re.split(r"[\[=<>!~;\s]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def _third_party_imports(code: str) -> set[str]:
    """Top-level modules a code block imports, the standard library left out."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names)


@pytest.mark.parametrize("script", ["serve.sh", "test.sh"])
def test_each_set_up_command_installs_what_the_python_examples_import(script: str) -> None:
    """After either set-up command, .venv has the examples' packages (the newcomer's ModuleNotFoundError)."""
    files = re.findall(r"bootstrap\.sh (\S+)", (ROOT / "scripts" / script).read_text(encoding="utf-8"))
    assert files, f"scripts/{script} installs no requirements file"
    installed = set().union(*(_requirement_names(ROOT / name) for name in files))
    modules = _third_party_imports(doc_example("python")) | _third_party_imports(doc_example("openai"))
    assert {"requests", "openai"} <= modules
    distributions = packages_distributions()
    for module in modules:
        wanted = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        assert wanted & installed, f"scripts/{script} does not install {module!r}, which the docs import"


def test_python_example_runs(demo_server, tmp_path: Path) -> None:
    result = run_python_example("python", demo_server.url, tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "'total_tokens'" in result.stdout


def run_shell_example(name: str, url: str, **replace: str) -> subprocess.CompletedProcess[str]:
    """Run a documented shell example from the repository root, against `url` through $GLMVISION_SERVER."""
    script = doc_example(name)
    for old, value in replace.items():
        script = script.replace(old, value)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    env.update(GLMVISION_SERVER=url, PYTHONIOENCODING="utf-8")
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_ask_example_streams_an_answer(demo_server) -> None:
    result = run_shell_example("cli-ask", demo_server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and "Traceback" not in result.stderr


def test_cli_batch_example_writes_a_line_per_image(demo_server, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    result = run_shell_example("cli-batch", demo_server.url, **{"/tmp/glmvision-results.jsonl": str(out)})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [record["path"] for record in records] == ["tests/data/screenshot.png"]
    assert records[0]["error"] is None and records[0]["usage"]["completion_tokens"] >= 1


def test_demo_model_info_is_reported(demo_server) -> None:
    import requests

    card = requests.get(demo_server.url + "/v1/models", timeout=10).json()["data"][0]
    assert card["demo"] is True and card["ready"] is True
    assert "SERVING THE DEMO MODEL" in demo_server.log()
    assert Path(demo_server.log_path).exists()


def test_openai_client_example_runs_verbatim(demo_server, tmp_path: Path) -> None:
    result = run_python_example("openai", demo_server.url, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    # One usage from the plain completion, one from the stream's usage chunk.
    assert result.stdout.count("CompletionUsage(") == 2


def test_responses_example_runs_verbatim(demo_server, tmp_path: Path) -> None:
    result = run_python_example("responses", demo_server.url, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    # The first answer's usage, then the streamed follow-up's, which reuses the stored conversation.
    assert result.stdout.count("ResponseUsage(") == 2
    follow_up = result.stdout.rsplit("ResponseUsage(", 1)[1]
    assert re.search(r"cached_tokens=[1-9]", follow_up), result.stdout


def test_structured_outputs_example_runs_verbatim(demo_server, tmp_path: Path) -> None:
    result = run_python_example("structured", demo_server.url, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    parsed, plain = result.stdout.splitlines()
    assert parsed.startswith("LowestBar(day=")
    assert plain.startswith("{'bars': ")


def test_tool_calling_example_runs_verbatim(demo_server, tmp_path: Path) -> None:
    result = run_python_example("openai-tools", demo_server.url, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    # tool_choice="required": even the demo model calls the tool, and answers after its result.
    assert result.stdout.startswith("finish_reason: tool_calls\n")
