#!/usr/bin/env bash
# The GPU checks on one CUDA machine (an H200 for the speed targets): the CUDA tests, then
# tools/gpu_checks.py (about 6 minutes; exits 1 if a speed or parity target is missed).
# Both always run; the script exits non-zero if either failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
status=0
"$PYTHON" -m pytest -q -rs tests/gpu || status=$?
"$PYTHON" tools/gpu_checks.py || status=$?
exit "$status"
