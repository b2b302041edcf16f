#!/usr/bin/env bash
# The GPU check (issue 23): real-size speed and memory of glmvision's engine on a random-weight
# GLM-4.6V-Flash, ~2-4 minutes on one H100 (at most ~8: a 450 s limit inside, 540 s here).
#   bash bench/gpu_check.sh                    # on a GPU box
#   bash bench/gpu_check.sh --cpu-smoke        # tiny config on the CPU (what the tests run)
#   bash bench/gpu_check.sh --bandwidth-gbs 1555   # a GPU the bandwidth table does not know
# Extra arguments go to bench/gpu_check.py (--help). PYTHON picks the interpreter (default: the
# repo's .venv, else python3); GPU_CHECK_TIMEOUT the outer limit in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-540}" "$python" bench/gpu_check.py "$@"
