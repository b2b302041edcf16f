"""Print the house's shape: modules per folder, imports that run back up, the longest functions.

`python scripts/house.py` from the project root. Two kinds of import climb: one from a subpackage to a
module at the top of `glmvision/` ("back up to the top"), and one to any module in an enclosing
package ("into an enclosing package": a room using its layer's shared base, such as web/protocol.py).
Imports against the layer order are import-linter's to refuse (setup.cfg).
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "glmvision"


def module_name(path: Path) -> str:
    """`glmvision/a/b.py` -> `glmvision.a.b`; packages are named by their folder."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, known: set[str], package: str) -> set[str]:
    """Every glmvision module a file imports, at any depth of the file (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            names = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def folder_of(module: str, packages: set[str]) -> str:
    """The package a module lives in (a package's own __init__ lives in itself)."""
    return module if module in packages else module.rpartition(".")[0]


def main() -> int:
    """Print the figures."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path): path for path in files}
    packages = {module_name(path) for path in files if path.name == "__init__.py"}
    per_folder = Counter(
        folder_of(name, packages) for name, path in modules.items() if path.name != "__init__.py"
    )
    to_top: list[str] = []
    upward: list[str] = []
    longest: list[tuple[int, str]] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        home = folder_of(name, packages)
        for target in imported_modules(tree, set(modules), home):
            there = folder_of(target, packages)
            if target not in packages and home != there and home.startswith(there + "."):
                upward.append(f"{name} -> {target}")
                if there == "glmvision":
                    to_top.append(f"{name} -> {target}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                longest.append((length, f"{name}.{node.name}"))
    print("modules per folder:")
    for folder, count in sorted(per_folder.items()):
        print(f"  {folder:40} {count}")
    print(f"folders: {len(per_folder)}, modules: {sum(per_folder.values())}, "
          f"most in one folder: {max(per_folder.values())}")
    print(f"imports back up to the top: {len(to_top)}")
    print(f"imports into an enclosing package: {len(upward)}")
    for line in sorted(upward):
        print(f"  {line}")
    print("longest functions (lines):")
    for length, where in sorted(longest, reverse=True)[:5]:
        print(f"  {length:4} {where}")
    for candidate in ("glmvision/pipeline.py", "glmvision/serving/pipeline.py"):
        if (ROOT / candidate).exists():
            print(f"lines in {candidate}: {len((ROOT / candidate).read_text().splitlines())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
