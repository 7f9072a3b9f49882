#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install this package into it.
#   bash scripts/setup_env.sh [extras]      e.g. bash scripts/setup_env.sh dev
# A plain `pip install torch` on a machine without one pulls a multi-GB CUDA build, so when
# torch is missing we install it first: $TORCH_SPEC (default torch==2.13.0, which on these
# CPU machines comes from the local wheel cache as the CPU build). On a GPU cluster set e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126"
# and on another CPU machine with internet access
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "installing ${TORCH_SPEC:-torch==2.13.0} into $VENV ..."
    # shellcheck disable=SC2086
    "$PY" -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
if [ -n "$EXTRAS" ]; then
    "$PY" -m pip install -q -e ".[$EXTRAS]"
else
    "$PY" -m pip install -q -e .
fi
