#!/usr/bin/env python3
"""Write the docs generated from the code: docs/errors.md and the README's error table, from the registry.

`.venv/bin/python scripts/gen_docs.py` rewrites them; `--check` only says whether they are stale (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, whatever the virtualenv has installed

from glmvision.core.errors import README_COLUMNS, errors_document, markdown_table  # noqa: E402

ERRORS_DOC = ROOT / "docs" / "errors.md"
README = ROOT / "README.md"


def with_error_table(readme: str) -> str:
    """The README with its error table (the lines from its header row on) replaced by the registry's."""
    table = markdown_table(README_COLUMNS).splitlines()
    lines = readme.splitlines(keepends=True)
    start = next(index for index, line in enumerate(lines) if line.rstrip("\n") == table[0])
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "".join([*lines[:start], *(line + "\n" for line in table), *lines[end:]])


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or, with --check, compare) every generated document; 1 when one was stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a document is stale")
    check = parser.parse_args(argv).check
    stale = []
    for path, render in ((ERRORS_DOC, lambda _: errors_document()), (README, with_error_table)):
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        wanted = render(current)
        if current != wanted:
            stale.append(path.relative_to(ROOT))
            if not check:
                path.write_text(wanted, encoding="utf-8")
    for path in stale:
        print(f"{path} {'is stale' if check else 'rewritten'}", file=sys.stderr)
    return 1 if stale and check else 0


if __name__ == "__main__":
    sys.exit(main())
