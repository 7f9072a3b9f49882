#!/usr/bin/env bash
# Several nodes, torchrun rendezvous. Run the same command on every node:
#   NNODES=4 MASTER_ADDR=node0.example MASTER_PORT=29500 bash examples/pretrain_gpt_multinode.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source examples/gpt_350m_flags.sh
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec torchrun --nnodes "$NNODES" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-gpt350m}" \
    pretrain_gpt.py "${GPT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
