#!/usr/bin/env bash
# Install (first time) and run the whole test suite, offline. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh requirements-dev.txt
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check glmvision tests wsgi.py deploy bench scripts integrations
exec .venv/bin/python -m pytest "$@"
