#!/usr/bin/env bash
# Install (first time) and start glmvision under gunicorn; serves the demo model unless
# GLMVISION_MODEL points at real weights. Extra arguments go to gunicorn.
set -euo pipefail
# A relative GLMVISION_MODEL is the caller's, not the repository root's this script moves to.
if [ -n "${GLMVISION_MODEL:-}" ] && [ -e "$GLMVISION_MODEL" ]; then
    GLMVISION_MODEL=$(realpath "$GLMVISION_MODEL")
    export GLMVISION_MODEL
fi
cd "$(dirname "$0")/.."
# requirements-examples.txt: the runtime plus requests and openai, so the documented Python examples
# run with .venv/bin/python as they are written.
bash scripts/bootstrap.sh requirements-examples.txt
exec .venv/bin/python -m gunicorn -c deploy/gunicorn.conf.py "$@" wsgi:app
