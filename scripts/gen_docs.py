#!/usr/bin/env python3
"""Write the docs generated from the code: docs/errors.md from the error registry, docs/configuration.md
from the settings models.

`.venv/bin/python scripts/gen_docs.py` rewrites them; `--check` only says whether they are stale (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, whatever the virtualenv has installed

from glmvision.core.config import SettingDoc, setting_docs  # noqa: E402
from glmvision.core.errors import errors_document  # noqa: E402

ERRORS_DOC = ROOT / "docs" / "errors.md"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
# docs/configuration.md's sections: an app setting goes to the first whose prefixes its field name starts
# with (so a new setting finds its place without an edit here); gunicorn's have their own; the rest, Other.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Model and device",
        ("model", "demo_cache", "device", "dtype", "warmup", "load_timeout", "torch_threads", "lora",
         "empty_cache_fraction"),
    ),
    (
        "Scheduling and engine",
        ("scheduler", "engine", "batch_", "max_batch_", "max_prefill_tokens", "max_queue", "queue_timeout",
         "request_timeout", "stall_seconds"),
    ),
    ("Request limits", ("max_", "default_max_new_tokens")),
    ("JSON schemas and grammars", ("grammar_", "schema_")),
    ("Image URLs", ("image_url_",)),
    (
        "Access control",
        ("api_keys", "rate_limit", "ratelimit_", "trusted_proxies", "allowed_ips", "breaker_"),
    ),
    ("Response cache", ("cache",)),
    ("Logs, metrics and audit", ("log_level", "request_log", "audit_", "metrics")),
    ("Degraded service and answers", ("degrade", "fallback_message", "redact")),
    ("Upstream engine (vLLM, SGLang)", ("backend", "upstream_")),
)  # fmt: skip
SERVER_SECTION = "Server (gunicorn)"
OTHER_SECTION = "Other"


def section(doc: SettingDoc) -> str:
    """The docs/configuration.md section a setting is listed in."""
    if doc.model == "gunicorn":
        return SERVER_SECTION
    field = doc.variable.removeprefix("GLMVISION_").lower()
    return next((title for title, prefixes in SECTIONS if field.startswith(prefixes)), OTHER_SECTION)


def _cell(text: str) -> str:
    # Outside `code`, '<model>' would be an HTML tag, '*' emphasis and '|' a column break.
    parts = text.split("`")
    for index in range(0, len(parts), 2):
        parts[index] = parts[index].replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")
    return "`".join(parts).replace("|", "\\|")


def accepted(doc: SettingDoc) -> str:
    """A setting's type and range in a few words: `int, 28 to 16384`, `one of auto, cpu`."""
    if doc.allowed.startswith("one of "):
        return doc.allowed
    return f"{doc.type}, {doc.allowed}" if doc.allowed else doc.type


def configuration_document() -> str:
    """docs/configuration.md: every GLMVISION_* setting with its type, default, range and meaning."""
    grouped: dict[str, list[SettingDoc]] = {}
    for doc in setting_docs():
        grouped.setdefault(section(doc), []).append(doc)
    order = [title for title, _ in SECTIONS] + [OTHER_SECTION, SERVER_SECTION]
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from glmvision/core/config.py by scripts/gen_docs.py; do not edit. -->",
        "",
        "Every setting is a `GLMVISION_*` environment variable, read once at start-up by the server "
        "(`glmvision serve`, gunicorn with `deploy/gunicorn.conf.py`, or `wsgi.py`) and checked against "
        "the type and range below.",
        "",
        "- `glmvision config` prints the settings the server would run with, as `GLMVISION_NAME=value` "
        "lines (secrets that are set show as `***`), without starting anything; an invalid value is one "
        "line naming the variable, the value and what is wrong (exit status 2).",
        "- `glmvision config --env-template > .env` writes every setting below, commented out, with its "
        "meaning and default: uncomment the ones to change.",
        "- A `bool` takes `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`); a list is "
        "comma-separated (`a,b,c`); an empty value means the default's empty meaning, as described.",
        "",
    ]
    for title in order:
        if title not in grouped:
            continue
        lines += [
            f"## {title}",
            "",
            "| Variable | Default | Accepted | Meaning |",
            "| --- | --- | --- | --- |",
        ]
        for doc in grouped[title]:
            default = f"`{doc.default}`" if doc.default else "(empty)"
            cells = [f"`{doc.variable}`", default, _cell(accepted(doc)), _cell(doc.description)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or, with --check, compare) every generated document; 1 when one was stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a document is stale")
    check = parser.parse_args(argv).check
    stale = []
    documents = (
        (ERRORS_DOC, errors_document),
        (CONFIG_DOC, configuration_document),
    )
    for path, render in documents:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        wanted = render()
        if current != wanted:
            stale.append(path.relative_to(ROOT))
            if not check:
                path.write_text(wanted, encoding="utf-8")
    for path in stale:
        print(f"{path} {'is stale' if check else 'rewritten'}", file=sys.stderr)
    return 1 if stale and check else 0


if __name__ == "__main__":
    sys.exit(main())
