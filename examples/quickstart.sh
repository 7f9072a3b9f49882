#!/usr/bin/env bash
# Quickstart: set up .venv and train a small Peri-LN GPT on one process, on Megatron's mock
# documents (no download). About a minute on a 2-core CPU; the loss falls from ~8.3 to ~2.
#   bash examples/quickstart.sh [extra pretrain_gpt.py flags]
# Checkpoints go to runs/quickstart (cleared first, so every run starts from scratch; with
# --save and --load the same directory, a rerun of the torchrun line alone resumes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
CKPT=runs/quickstart
rm -rf "$CKPT"
exec .venv/bin/torchrun --nproc_per_node 1 pretrain_gpt.py \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
    --seq-length 128 --max-position-embeddings 128 \
    --norm-placement peri --normalization RMSNorm --swiglu \
    --position-embedding-type rope --disable-bias-linear \
    --mock-data --tokenizer-type NullTokenizer --vocab-size 4096 \
    --micro-batch-size 8 --global-batch-size 16 --train-iters 200 \
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 \
    --weight-decay 0.1 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0 \
    --log-interval 20 --eval-interval 100 --eval-iters 5 --num-workers 1 \
    --save "$CKPT" --load "$CKPT" --save-interval 100 "$@"
