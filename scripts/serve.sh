#!/usr/bin/env bash
# Install (first time) and start glmvision under gunicorn; serves the demo model unless
# GLMVISION_MODEL points at real weights. Extra arguments go to gunicorn.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh requirements.txt
exec .venv/bin/python -m gunicorn -c deploy/gunicorn.conf.py "$@" wsgi:app
