#!/usr/bin/env bash
# Set up .venv with the [dev] extras and run the test suite (what CI runs).
#   bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh dev
exec .venv/bin/python -m pytest -q "$@"
