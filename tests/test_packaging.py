"""The package says what it needs and who it is: install_requires covers every third-party import, and
the version is written once and printed by `glmvision --version` and `python -m glmvision`."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import subprocess
import sys

from helpers import ROOT

import glmvision


def third_party_imports() -> set[str]:
    """Top-level modules the package imports that are neither its own nor the standard library's."""
    found: set[str] = set()
    for path in (ROOT / "glmvision").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    ours = {"glmvision", "_typeshed"}  # _typeshed: type checkers' own, imported under TYPE_CHECKING
    return {name for name in found if name not in sys.stdlib_module_names and name not in ours}


def required_distributions() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].split("\n")
    names = (re.split(r"[<>=!~ \[]", line.strip())[0] for line in lines if line.strip())
    return {name.lower().replace("_", "-") for name in names}


def test_install_requires_names_every_distribution_the_code_imports() -> None:
    providers = importlib.metadata.packages_distributions()
    required = required_distributions()
    missing = {}
    for module in third_party_imports():
        distributions = {name.lower().replace("_", "-") for name in providers.get(module, [])}
        assert distributions, f"{module} is imported but no installed distribution provides it"
        if not distributions & required:
            missing[module] = sorted(distributions)
    assert not missing, f"install_requires lacks what these imports need: {missing}"


def test_the_version_is_defined_once_and_printed() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["version"] == "attr: glmvision.__version__"
    for command in (["-m", "glmvision", "--version"], ["-m", "glmvision.cli.main", "--version"]):
        result = subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"glmvision {glmvision.__version__}"
