"""The house's rules, checked: the layer contracts in setup.cfg hold, and the package has no flat top."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "glmvision"


def _lint_imports() -> subprocess.CompletedProcess[str]:
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    command = [sys.executable, "-c", code]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_every_import_linter_contract_is_kept() -> None:
    result = _lint_imports()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    names = [config[section]["name"] for section in config.sections() if section.startswith("importlinter:")]
    assert len(names) >= 3
    for name in names:
        assert f"{name} KEPT" in " ".join(result.stdout.split()), name


def test_an_upward_import_breaks_the_build(tmp_path: Path) -> None:
    """The contracts can fail: a core module that imports the web layer is reported."""
    probe = PACKAGE / "core" / "_layer_probe.py"
    probe.write_text("from glmvision.web import app  # noqa: F401\n")
    try:
        result = _lint_imports()
    finally:
        probe.unlink()
    assert result.returncode != 0
    assert "glmvision.core._layer_probe -> glmvision.web.app" in result.stdout


def test_the_top_of_the_package_holds_only_its_face() -> None:
    modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py", "__main__.py"]
    layers = {"core", "postprocess", "backends", "ops", "serving", "web"}
    layers |= {"server", "training", "client", "cli"}
    folders = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert folders == layers


def test_importing_the_package_loads_neither_flask_nor_torch() -> None:
    code = "import sys, glmvision; print(sorted({'flask', 'torch'} & set(sys.modules)))"
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "[]", result.stderr
