#!/usr/bin/env bash
# One node with 8 GPUs:  bash examples/pretrain_gpt_8gpu.sh [extra flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/gpt_350m_flags.sh
exec torchrun --nproc_per_node 8 pretrain_gpt.py \
    "${GPT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
