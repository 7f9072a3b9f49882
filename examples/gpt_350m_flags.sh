# Flags of a ~350M-parameter Peri-LN GPT, sourced by the GPU launch scripts in this folder.
# Override any of these variables in the environment before launching.
NORM_PLACEMENT="${NORM_PLACEMENT:-peri}"
TP="${TP:-1}"                 # --tensor-model-parallel-size
PP="${PP:-1}"                 # --pipeline-model-parallel-size
MICRO_BATCH="${MICRO_BATCH:-4}"
GLOBAL_BATCH="${GLOBAL_BATCH:-256}"
TRAIN_ITERS="${TRAIN_ITERS:-20000}"
CKPT="${CKPT:-checkpoints/gpt350m-${NORM_PLACEMENT}}"

GPT_ARGS=(
    --num-layers 24 --hidden-size 1024 --num-attention-heads 16
    --seq-length 2048 --max-position-embeddings 2048
    --norm-placement "$NORM_PLACEMENT" --normalization RMSNorm --swiglu
    --position-embedding-type rope --disable-bias-linear
    --untie-embeddings-and-output-weights
    --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.02
)
TRAIN_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --train-iters "$TRAIN_ITERS" --bf16
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-fraction 0.01
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
)
# Tokenized data from tools/preprocess_data.py (DATA_PATH may be a weighted blend:
# "0.3 data/a_text_document 0.7 data/b_text_document"); mock documents when unset.
if [ -n "${DATA_PATH:-}" ]; then
    # shellcheck disable=SC2206
    DATA_ARGS=(--data-path $DATA_PATH --split 969,30,1
               --tokenizer-type "${TOKENIZER_TYPE:-GPTSentencePieceTokenizer}"
               --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL}" --num-workers 2)
else
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --num-workers 2)
fi
OUTPUT_ARGS=(
    --log-interval 10 --eval-interval 1000 --eval-iters 10
    --save "$CKPT" --load "$CKPT" --save-interval 1000
)
