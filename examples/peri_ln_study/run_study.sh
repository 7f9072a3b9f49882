#!/usr/bin/env bash
# The Peri-LN paper's placement comparison on CPUs (about 30-40 minutes on 2 cores):
# pre, post, mix, peri and peri+embnorm x 3 learning rates x 2 seeds = 30 small GPT runs, then
# <output>/report.md with tables, figures and a summary.
#   bash examples/peri_ln_study/run_study.sh [--output runs/peri_ln_study]
#       [--data-path PREFIX --tokenizer-model TOK.model] [other run_study.py flags]
# Without --data-path it builds the quickstart's sample corpus, tokenizer and data files
# (the same steps and paths as examples/quickstart.sh). Rerunning resumes an interrupted study.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash scripts/setup_env.sh plot  # the package and matplotlib (for the figures)
if [[ " $* " != *" --data-path "* && " $* " != *" --data-path="* ]]; then
    bash scripts/make_sample_data.sh
fi
exec .venv/bin/python examples/peri_ln_study/run_study.py "$@"
