#!/usr/bin/env bash
# The Peri-LN study at the paper's 400M scale (24 layers, hidden 1024, seq 2048, bf16,
# global batch 256, lr 1e-3/2e-3/4e-3, 10,000 iterations) on all visible GPUs, one run at a time.
#   bash examples/peri_ln_study/run_study_gpu.sh --data-path PREFIX --tokenizer-model TOK.model \
#       [--output runs/peri_ln_study_gpu] [--train-iters 2000] [--gpus 8] [other run_study.py flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash scripts/setup_env.sh plot  # the package and matplotlib (for the figures)
exec .venv/bin/python examples/peri_ln_study/run_study.py --preset gpu \
    --output runs/peri_ln_study_gpu "$@"
