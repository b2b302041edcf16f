"""The docs site: `mkdocs build --strict` passes, and its generated pages match the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import ROOT

DOCS = ROOT / "docs"


def test_mkdocs_build_strict_passes(tmp_path: Path) -> None:
    # Material prints a banner about MkDocs 2.0 on every build unless told not to: it is not a warning.
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    assert "GLMVISION_MAX_QUEUE" in (site / "configuration" / "index.html").read_text(encoding="utf-8")
    # architecture.md's ```mermaid blocks go through the custom fence, for Material to draw.
    assert '<pre class="mermaid">' in (site / "architecture" / "index.html").read_text(encoding="utf-8")


def test_every_docs_page_is_in_the_nav() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)

    def pages(nav: object) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, list):
            return [page for item in nav for page in pages(item)]
        if isinstance(nav, dict):
            return [page for value in nav.values() for page in pages(value)]
        return []

    in_nav = pages(config["nav"])
    on_disk = sorted(path.name for path in DOCS.glob("*.md"))
    assert sorted(in_nav) == on_disk, "add each docs/*.md page to mkdocs.yml's nav (and only those)"


def test_generated_docs_are_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_docs.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}run scripts/gen_docs.py"


def test_every_setting_glmvision_config_prints_is_on_the_configuration_page() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVISION_")}
    result = subprocess.run(
        [sys.executable, "-m", "glmvision", "config"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = re.findall(r"^(GLMVISION_[A-Z0-9_]+)=", result.stdout, flags=re.MULTILINE)
    assert len(printed) > 50
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(GLMVISION_[A-Z0-9_]+)` \|", page, flags=re.MULTILINE))
    assert sorted(set(printed) - documented) == []
