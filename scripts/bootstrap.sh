#!/usr/bin/env bash
# Create .venv and install the given requirements file into it (skipped when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="${1:-requirements.txt}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.installed-$(basename "$requirements")"
# Every requirements file (they include each other with -r) and the package metadata.
digest=$(cat "$requirements" requirements*.txt docs/requirements.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r "$requirements"
    .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
    echo "$digest" > "$stamp"
fi
