#!/usr/bin/env bash
# One idempotent set-up for a fresh machine: torch (CPU build where there is no GPU), then dpo_fast.
#   bash scripts/setup.sh          -> package + runtime deps
#   bash scripts/setup.sh test     -> also the test extras
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=${1:-}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$PY" -m pip install --quiet torch
    else
        # CPU machine: a pinned CPU build, never the multi-GB CUDA wheel an unpinned 'torch' pulls.
        "$PY" -m pip install --quiet "torch==2.13.0"
    fi
fi

target="."
[ "$extra" = "test" ] && target=".[test]"
"$PY" -m pip install --quiet --disable-pip-version-check -e "$target"
