"""The flags of Megatron-LM's own launch scripts, shrunk to a small model and mock data.

Taken from NVIDIA/Megatron-LM at d98e8a64 (2026-08-22):
    examples/gpt3/train_gpt3_175b_distributed.sh
    examples/llama/train_llama3_8b_h100_fp8.sh   (the only dense llama script there)
and, for the GPT-3 script as released with megatron-core 0.16 (before commit 532ad926,
"Replace rampup batch size scheduler with custom step batch size schedules"), its
``--rampup-batch-size 16 16 5859375`` line.

Each script is a list of flag groups ``[flag, *values]`` in the script's order. Everything is
as the script has it except: sizes (layers, hidden, heads, sequence, batch, iterations,
intervals) are small; the parallel sizes are 1 (one process); a real tokenizer and data path
become ``--mock-data --tokenizer-type NullTokenizer --vocab-size``; paths point into the
test's directory (``{ckpt}``, ``{tb}``, ``{cache}``); and ``--norm-placement peri`` is added,
the one flag a Megatron-LM user adds here. The original values are in the comments.
"""

GPT3_175B = [
    # GPT_MODEL_ARGS
    ["--num-layers", "2"],                      # 96
    ["--hidden-size", "64"],                    # 12288
    ["--num-attention-heads", "4"],             # 96
    ["--seq-length", "32"],                     # 2048
    ["--max-position-embeddings", "32"],        # 2048
    ["--attention-backend", "auto"],
    # TRAINING_ARGS
    ["--micro-batch-size", "1"],
    ["--global-batch-size", "4"],               # 1536
    ["--step-batch-size-schedule", "0:2 64:4"],  # "0:16 2.4B:320 4.8B:624 ... 12B:1536"
    ["--train-iters", "3"],                     # 500000
    ["--weight-decay", "0.1"],
    ["--adam-beta1", "0.9"],
    ["--adam-beta2", "0.95"],
    ["--init-method-std", "0.006"],
    ["--clip-grad", "1.0"],
    ["--fp16"],
    ["--lr", "6.0e-5"],
    ["--lr-decay-style", "cosine"],
    ["--min-lr", "6.0e-6"],
    ["--lr-warmup-fraction", ".001"],
    ["--lr-decay-iters", "3"],                  # 430000
    # MODEL_PARALLEL_ARGS
    ["--tensor-model-parallel-size", "1"],      # 8
    ["--pipeline-model-parallel-size", "1"],    # 16
    # DATA_ARGS: --data-path $DATA_PATH --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE
    ["--mock-data"],
    ["--tokenizer-type", "NullTokenizer"],
    ["--vocab-size", "500"],
    ["--split", "949,50,1"],
    # EVAL_AND_LOGGING_ARGS
    ["--log-interval", "1"],                    # 100
    ["--save-interval", "2"],                   # 10000
    ["--eval-interval", "2"],                   # 1000
    ["--save", "{ckpt}"],
    ["--load", "{ckpt}"],
    ["--eval-iters", "1"],                      # 10
    ["--tensorboard-dir", "{tb}"],
    ["--norm-placement", "peri"],
]

# The same script as released with megatron-core 0.16: a ramp instead of the step schedule.
GPT3_175B_CORE_R016 = [
    ["--rampup-batch-size", "2", "2", "8"] if group[0] == "--step-batch-size-schedule"
    else group for group in GPT3_175B]          # --rampup-batch-size 16 16 5859375

# Megatron-LM refuses both: "Cannot specify both --step-batch-size-schedule and
# --global-batch-size", and "expected no batch-size rampup for iteration-based training"
# (megatron/training/arguments.py). What it runs is the script without that one line.
GPT3_175B_RUNNABLE = [group for group in GPT3_175B
                      if group[0] != "--step-batch-size-schedule"]


def _llama(dtype: str):
    model = [
        ["--use-mcore-models"],
        ["--num-layers", "2"],                  # 32
        ["--hidden-size", "64"],                # 4096
        ["--ffn-hidden-size", "224"],           # 14336 (the same 3.5 x hidden)
        ["--num-attention-heads", "4"],         # 32
        ["--group-query-attention"],
        ["--num-query-groups", "2"],            # 8
        ["--kv-channels", "16"],                # 128
        ["--seq-length", "32"],                 # 8192
        ["--max-position-embeddings", "32"],    # 8192
        ["--position-embedding-type", "rope"],
        ["--rotary-base", "1000000"],
        ["--rotary-percent", "1.0"],
        ["--attention-dropout", "0.0"],
        ["--hidden-dropout", "0.0"],
        ["--swiglu"],
        ["--normalization", "RMSNorm"],
        ["--init-method-std", "0.0134"],
        ["--attention-backend", "fused"],
        ["--apply-layernorm-1p"],
        ["--untie-embeddings-and-output-weights"],
        ["--disable-bias-linear"],
    ]
    training = [
        ["--micro-batch-size", "1"],
        ["--global-batch-size", "4"],           # 128
        ["--train-samples", "12"],              # 1953125000
        ["--lr-decay-samples", "12"],           # 1949218748
        ["--lr-warmup-samples", "4"],           # 3906252
        ["--lr", "0.00015"],
        ["--min-lr", "0.00001"],
        ["--decoupled-lr", "5.0e-4"],
        ["--decoupled-min-lr", "4.5e-5"],
        ["--lr-decay-style", "cosine"],
        ["--clip-grad", "1.0"],
        ["--weight-decay", "0.1"],
        ["--adam-beta1", "0.9"],
        ["--adam-beta2", "0.95"],
        ["--bf16"],
        ["--grad-reduce-in-bf16"],
        ["--cross-entropy-loss-fusion"],
        ["--calculate-per-token-loss"],
        ["--manual-gc"],
        ["--empty-unused-memory-level", "1"],
        ["--exit-duration-in-mins", "235"],
        # DDP_ARGS
        ["--use-distributed-optimizer"],
        ["--overlap-grad-reduce"],
        ["--overlap-param-gather"],
    ]
    dtype_args = [
        ["--fp8-format", "hybrid"],
        ["--fp8-amax-history-len", "1024"],
        ["--fp8-amax-compute-algo", "max"],
        ["--fp8-param-gather"],
    ] if dtype == "fp8" else []
    parallel = [
        ["--tensor-model-parallel-size", "1"],
        ["--context-parallel-size", "1"],
        ["--sequence-parallel"],
    ]
    data = [  # the script's MOCK branch (its default); quotes as bash word splitting leaves them
        ["--mock-data"],
        ["--tokenizer-type", "NullTokenizer"],
        ["--vocab-size", "500"],                # 128256
        ["--data-cache-path", "{cache}"],
        ["--tiktoken-pattern", "v2"],
        ["--split", "'99,1,0'"],
        ["--no-create-attention-mask-in-dataloader"],
        ["--no-mmap-bin-files"],
        ["--num-workers", "1"],
    ]
    logging = [
        ["--log-interval", "1"],
        ["--eval-iters", "1"],                  # 32
        ["--eval-interval", "2"],               # 100
        ["--save-interval", "2"],               # 1000
        ["--log-throughput"],
        ["--profile"],
        ["--profile-step-start", "4"],
        ["--profile-step-end", "6"],
        ["--ckpt-format", "torch_dist"],
        ["--distributed-timeout-minutes", "60"],
        ["--save", "{ckpt}"],
        ["--load", "{ckpt}"],
        ["--tensorboard-dir", "{tb}"],
    ]
    return model + training + dtype_args + parallel + data + logging + \
        [["--norm-placement", "peri"]]


LLAMA3_8B_FP8 = _llama("fp8")  # the script as it is: DTYPE="fp8"
LLAMA3_8B_BF16 = _llama("bf16")  # the script with its DTYPE="bf16"

SCRIPTS = {"gpt3_175b": GPT3_175B, "gpt3_175b_core_r0.16": GPT3_175B_CORE_R016,
           "gpt3_175b_runnable": GPT3_175B_RUNNABLE,
           "llama3_8b_fp8": LLAMA3_8B_FP8, "llama3_8b_bf16": LLAMA3_8B_BF16}


def argv(groups, **paths):
    """The flat command line, with ``{ckpt}``-style paths filled in."""
    return [word.format(**paths) for group in groups for word in group]
