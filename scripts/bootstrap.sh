#!/usr/bin/env bash
# Create .venv and install the given requirements file into it (skipped when nothing changed).
# Prints one line per stage, and each package pip downloads with its size, so a first install of
# several GB is not minutes of silence; pip's full output goes to .venv/.pip.log.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="${1:-requirements.txt}"
python="${PYTHON:-python3}"
stage() { echo "bootstrap: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
    stage "creating .venv with $python"
    "$python" -m venv .venv
fi
stamp=".venv/.installed-$(basename "$requirements")"
log=".venv/.pip.log"
# Every requirements file (they include each other with -r) and the package metadata.
digest=$(cat "$requirements" requirements*.txt $(ls docs/requirements.txt 2>/dev/null) setup.cfg pyproject.toml | sha256sum | cut -d" " -f1)
pip_install() {
    # The wheel's name-version and the size pip prints beside it, for each download or cache hit.
    if ! .venv/bin/python -m pip install --progress-bar off "$@" 2>&1 | tee -a "$log" \
        | sed -un 's/^ *\(Downloading\|Using cached\) \([^ ]*\/\)\{0,1\}\([^-/ ]*-[^-/ ]*\)[^ ]* (\(.*\))$/  \3 (\4)/p' >&2
    then
        stage "pip failed; the end of $log:"
        tail -n 20 "$log" >&2
        exit 1
    fi
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
    : > "$log"
    if [ -e "$stamp" ]; then
        size="only what changed"
    else
        size="about 6 GB on a first install, mostly torch and its CUDA libraries: several minutes"
    fi
    stage "upgrading pip"
    pip_install --quiet --upgrade pip
    stage "installing $requirements ($size)"
    pip_install -r "$requirements"
    stage "installing glmvision itself (editable, no downloads)"
    pip_install --quiet --no-deps --no-build-isolation -e .
    echo "$digest" > "$stamp"
    stage "done; pip's full output is in $log"
else
    stage "$requirements already installed in .venv"
fi
