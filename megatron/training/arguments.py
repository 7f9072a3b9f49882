"""Command-line flags (Megatron-LM's names and defaults) and their validation.

``parse_args`` turns argv into a namespace; ``validate_args`` fills in derived values and
rejects what cannot work with one sentence (``ArgumentError``) before anything heavy runs;
``transformer_config_from_args`` / ``optimizer_config_from_args`` build the core configs.
"""

import argparse
import os
import re
import sys
import time

import torch

from megatron.core import ConfigError
from megatron.core.datasets.conversations import SFTDataError
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.sft_dataset import open_tokenized
from megatron.core.datasets.utils import DataError, parse_and_normalize_split, parse_blend
from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.num_microbatches_calculator import (
    build_num_microbatches_calculator,
    train_iters_for_samples,
)
from megatron.core.optimizer import OptimizerConfig
from megatron.core.parallel_state import check_parallel_sizes
from megatron.core.tokenizers import TOKENIZER_TYPES
from megatron.core.transformer import NormPlacement, TransformerConfig
from megatron.core.transformer.context_parallel import check_sequence_length
from megatron.training.fp8_args import add_fp8_args, fp8_args_error, fp8_recipe_from_args
from megatron.training.layer_stats import add_layer_stats_args, layer_stats_args_error
from megatron.training.learning_rates import OptimizerParamScheduler
from megatron.training.logging_args import add_logging_args, logging_args_error
from megatron.training.megatron_lm_flags import (
    add_megatron_lm_args,
    no_effect_switch,
    unknown_flag_message,
    validate_megatron_lm_args,
)
from megatron.training.recompute_args import add_recompute_args, recompute_args_error
from megatron.training.update_guard import add_guard_args, guard_args_error


class ArgumentError(Exception):
    """A flag value that cannot work; the message is one sentence naming the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise ArgumentError(message[0].upper() + message[1:] + ".")

    def parse_args(self, args=None, namespace=None):  # unknown flag: name the closest known
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            raise ArgumentError(unknown_flag_message(extras, self._option_string_actions))
        return namespace


# Megatron-LM flags that only select fused kernels or allocation strategies there; the
# computation they describe is what this codebase always does, so scripts may keep them.
ACCEPTED_NO_OP_FLAGS = (
    "--use-mcore-models", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-gradient-accumulation-fusion",
    "--no-async-tensor-model-parallel-allreduce", "--attention-softmax-in-fp32",
    "--accumulate-allreduce-grads-in-fp32", "--use-flash-attn", "--no-rope-fusion",
    "--use-cpu-initialization", "--no-persist-layer-norm",
)


def _add_network_args(p):
    g = p.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "yarn", "mrope", "relative", "none"])
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--qk-layernorm", action="store_true",
                   help="normalize queries and keys per head (over kv-channels) before RoPE")
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="store every norm's gain zero-centred, applied as (1 + weight)")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"])
    g = p.add_argument_group("normalization placement")
    g.add_argument("--norm-placement", default="pre", choices=[m.value for m in NormPlacement],
                   help="pre: x+F(N(x)); post: N(x+F(x)); peri: x+N(F(N(x))); mix: Mix-LN")
    g.add_argument("--mix-ln-alpha", type=float, default=0.25,
                   help="fraction of leading Post-LN layers under --norm-placement mix")
    g.add_argument("--embedding-norm", action="store_true",
                   help="normalize the embedding output before the first layer")


def _add_training_args(p):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None,
                   help="train on this many samples (instead of --train-iters); the learning "
                   "rate schedule is then counted in samples as well")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None,
                   metavar=("START", "INCREMENT", "RAMPUP_SAMPLES"),
                   help="grow the global batch size from START by INCREMENT up to "
                   "--global-batch-size over RAMPUP_SAMPLES samples (needs --train-samples)")
    g.add_argument("--step-batch-size-schedule", type=str, default=None,
                   metavar='"THRESHOLD:BATCH_SIZE ..."',
                   help='Megatron-LM\'s step schedule, e.g. "0:16 2.4B:320 12B:1536": the global '
                   "batch size once THRESHOLD tokens (K/M/B/T suffixes, floored to whole "
                   "--seq-length samples) are consumed; replaces --global-batch-size and "
                   "needs --train-samples")
    g.add_argument("--manual-gc", action="store_true",
                   help="disable Python's automatic garbage collector; collect every "
                   "--manual-gc-interval iterations and around evaluations")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: iterations between collections (0: never)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: no collection before and after each evaluation")
    g.add_argument("--no-host-memory-reuse", dest="host_memory_reuse", action="store_false",
                   help="on a CPU, leave glibc's malloc as it is (by default freed memory is "
                   "kept for the next step, which spares a step's page faults)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save (with --save) and exit after an iteration that is a multiple")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save (with --save) and exit once training has run this long")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal, save (with --save) at the end of the iteration "
                   "and exit 0")
    g.add_argument("--exit-signal", default="SIGTERM",
                   choices=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"])
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", default="adam", choices=["adam"])
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear",
                   choices=list(OptimizerParamScheduler.DECAY_STYLES))
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=list(OptimizerParamScheduler.WSD_STYLES))
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)


def _add_io_args(p):
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--log-interval", type=int, default=100)
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--no-load-optim", action="store_true",
                   help="load weights, iteration and data position; a fresh optimizer")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration from --load instead of the tracker's")
    g.add_argument("--ckpt-keep-last", type=int, default=None,
                   help="keep only the newest N checkpoints (older ones are removed once a "
                   "newer one is complete)")
    g.add_argument("--async-save", action="store_true",
                   help="copy the state to CPU memory and write the files in the background")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model's flags (and the tokenizer's) from the --load checkpoint")
    g.add_argument("--finetune", action="store_true",
                   help="load only the weights; start at iteration 0 with a fresh optimizer")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="when --load holds no checkpoint yet (or is not given), start from "
                   "this checkpoint's weights (iteration 0, fresh optimizer); a fine-tuning "
                   "run saved to --load resumes from there instead")
    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ... (a weighted blend)")
    g.add_argument("--split", default="969, 30, 1")
    g.add_argument("--train-data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)
    g.add_argument("--test-data-path", nargs="*", default=None)
    g.add_argument("--data-cache-path", default=None,
                   help="where to cache dataset indices (default: next to each dataset)")
    g.add_argument("--tokenizer-type", default=None, choices=list(TOKENIZER_TYPES))
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--dataloader-type", default=None, choices=["single", "cyclic", "external"],
                   help="single: one pass in order; cyclic: shuffled per epoch, repeating")
    g.add_argument("--no-data-sharding", dest="data_sharding", action="store_false",
                   help="--dataloader-type cyclic: shuffle the whole dataset rather than each "
                   "data-parallel rank's own part")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="average the loss over the global batch's unmasked tokens (across "
                   "micro-batches and data-parallel ranks), not over micro-batches")
    g = p.add_argument_group("supervised fine-tuning")
    g.add_argument("--sft", action="store_true",
                   help="fine-tune on conversations: --data-path (split by --split) or "
                   "--train-data-path/--valid-data-path name JSONL files of {\"messages\": "
                   "[{\"role\", \"content\"}, ...]} or {\"prompt\", \"response\"} lines; "
                   "loss on the assistant's tokens only, conversations packed per sequence")
    g.add_argument("--sft-overlong", default="truncate", choices=["truncate", "skip"],
                   help="a conversation longer than --seq-length: keep its beginning, or leave "
                   "it out (both are counted)")
    g = p.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per model chunk: the interleaved schedule with "
                   "num-layers / (pipeline size x this) chunks per rank")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="model chunks per pipeline rank (the other way to ask for the "
                   "interleaved schedule)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="ranks that split every sequence (long contexts): each holds 1/N of it "
                   "and attention exchanges keys and values among them")
    g.add_argument("--cp-comm-type", nargs="+", default=["p2p"],
                   help="how context-parallel attention exchanges keys and values: p2p (a ring "
                   "overlapping each transfer with attention) or all_gather (Megatron-LM's "
                   "allgather too); one value, or one per layer")
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"])
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state and fp32 master weights over data-parallel "
                   "ranks (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradient buckets during the last backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="all-gather the distributed optimizer's updated parameters "
                   "asynchronously, overlapped with the next forward pass")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="elements per gradient bucket (default: Megatron-LM's)")
    g = p.add_argument_group("accepted for Megatron-LM compatibility (no effect)")
    for flag in ACCEPTED_NO_OP_FLAGS:
        no_effect_switch(g, flag, help=argparse.SUPPRESS)


def parse_args(argv=None, extra_args_provider=None):
    """Parse ``argv`` (default: sys.argv[1:]); raises ArgumentError on an unknown flag."""
    parser = _Parser(description="Megatron-style GPT training", allow_abbrev=False)
    _add_network_args(parser)
    _add_training_args(parser)
    _add_io_args(parser)
    add_logging_args(parser)
    add_layer_stats_args(parser)
    add_guard_args(parser)
    add_fp8_args(parser)
    add_recompute_args(parser)
    add_megatron_lm_args(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser.parse_args(argv)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Config fields whose flag is not simply the field name with dashes.
_FIELD_FLAGS = {"gated_linear_unit": "--swiglu", "add_bias_linear": "--disable-bias-linear",
                "share_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
                "num_layers_in_first_pipeline_stage": "--decoder-first-pipeline-num-layers",
                "num_layers_in_last_pipeline_stage": "--decoder-last-pipeline-num-layers",
                "layernorm_zero_centered_gamma": "--apply-layernorm-1p"}


def config_error_to_flags(message: str, args) -> str:
    """Rewrite a core ConfigError's ``field=value`` mentions as ``--flag value``."""
    def repl(m):
        name, value = m.group(1), m.group(2)
        if name in _FIELD_FLAGS:
            return f"{_FIELD_FLAGS[name]} ({value})"
        return f"{_flag(name)} {value}" if hasattr(args, name) else m.group(0)
    message = re.sub(r"\b([a-z][a-z0-9_]*)=(\S+?)(?=[\s,;:)]|\.?$|\.\s)", repl, message)
    return re.sub(r"(?<!-)\b([a-z]+_[a-z0-9_]+)\b",
                  lambda m: _flag(m.group(1)) if hasattr(args, m.group(1)) else m.group(0),
                  message)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def validate_args(args, world_size: int = None):
    """Fill in derived values and check that the run can work; raises ArgumentError."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.world_size = world_size
    args.rank = int(os.environ.get("RANK", "0"))
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "micro_batch_size", "lr"):
        _require(getattr(args, name) is not None, f"{_flag(name)} is required.")
    _require(args.seq_length > 0, f"--seq-length {args.seq_length} must be positive.")
    _require(not (args.fp16 and args.bf16),
             "--fp16 and --bf16 were both given; choose one precision.")
    validate_megatron_lm_args(args)
    try:
        args.data_parallel_size = check_parallel_sizes(
            world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.context_parallel_size)
    except ConfigError as e:
        raise ArgumentError(config_error_to_flags(str(e), args)) from None
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False  # Megatron-LM drops it silently at TP=1 as well
    if args.sequence_parallel:
        _require(args.seq_length % args.tensor_model_parallel_size == 0,
                 f"--seq-length {args.seq_length} is not divisible by "
                 f"--tensor-model-parallel-size {args.tensor_model_parallel_size}; sequence "
                 "parallelism splits the sequence evenly across tensor-parallel ranks.")
    _validate_context_parallel(args)
    _validate_pipeline(args)
    _validate_batch(args)
    _validate_data(args)
    _validate_schedule(args)
    for check in (logging_args_error, layer_stats_args_error, guard_args_error,
                  fp8_args_error, recompute_args_error):
        _require(check(args) is None, check(args))
    if args.transformer_impl == "transformer_engine":  # last: it imports TransformerEngine
        problem = te_ext.availability_problem(fp8=args.fp8_format is not None)
        _require(problem is None, problem)
    _require(not args.overlap_param_gather or args.use_distributed_optimizer,
             "--overlap-param-gather needs --use-distributed-optimizer (only the distributed "
             "optimizer all-gathers parameters after its step).")
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if torch.cuda.is_available() else "gloo"
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 \
        else torch.float32
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute":
        _require(args.max_position_embeddings >= args.seq_length,
                 f"--max-position-embeddings {args.max_position_embeddings} is shorter than "
                 f"--seq-length {args.seq_length}; learned positions need a row per position.")
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    try:  # build the configs once now so their checks run before any heavy work
        config = transformer_config_from_args(args)
        optimizer_config_from_args(args)
    except ConfigError as e:
        raise ArgumentError(config_error_to_flags(str(e), args)) from None
    # Record derived sizes, so checkpoints compare what the model is, not how it was asked for.
    args.ffn_hidden_size, args.kv_channels = config.ffn_hidden_size, config.kv_channels
    return args


def _validate_context_parallel(args):
    if args.context_parallel_size == 1:
        return
    try:
        check_sequence_length(args.seq_length, args.context_parallel_size,
                              args.tensor_model_parallel_size if args.sequence_parallel else 1)
    except ConfigError as e:
        raise ArgumentError(config_error_to_flags(str(e), args)) from None


def _validate_pipeline(args):
    _virtual_stages_to_layers(args)
    pp, per_chunk = args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage
    args.virtual_pipeline_model_parallel_size = None
    if args.num_virtual_stages_per_pipeline_rank is not None and per_chunk is None:
        _require(pp > 1, "--num-virtual-stages-per-pipeline-rank needs "
                 "--pipeline-model-parallel-size > 1.")  # uneven first/last stages
        vp = args.num_virtual_stages_per_pipeline_rank
        args.virtual_pipeline_model_parallel_size = vp if vp > 1 else None
    if per_chunk is not None:
        _require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs "
                 "--pipeline-model-parallel-size > 1.")
        _require(per_chunk > 0 and args.num_layers % (pp * per_chunk) == 0,
                 f"--num-layers {args.num_layers} is not divisible by "
                 f"--pipeline-model-parallel-size {pp} x "
                 f"--num-layers-per-virtual-pipeline-stage {per_chunk}.")
        vp = args.num_layers // (pp * per_chunk)
        args.virtual_pipeline_model_parallel_size = vp if vp > 1 else None


def _virtual_stages_to_layers(args):
    """Megatron-LM's two ways to ask for virtual stages are exclusive; with an even split,
    --num-virtual-stages-per-pipeline-rank becomes the layers per chunk it means, so both
    spellings give the same run and the same checkpoints."""
    stages = args.num_virtual_stages_per_pipeline_rank
    if stages is None:
        return
    _require(args.num_layers_per_virtual_pipeline_stage is None,
             "--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank "
             "were both given; choose one.")
    _require(stages > 0, f"--num-virtual-stages-per-pipeline-rank {stages} must be positive.")
    pp = args.pipeline_model_parallel_size
    uneven = args.decoder_first_pipeline_num_layers is not None or \
        args.decoder_last_pipeline_num_layers is not None
    if not uneven and pp > 1:
        _require(args.num_layers % (pp * stages) == 0,
                 f"--num-layers {args.num_layers} is not divisible by "
                 f"--pipeline-model-parallel-size {pp} x "
                 f"--num-virtual-stages-per-pipeline-rank {stages}.")
        args.num_layers_per_virtual_pipeline_stage = args.num_layers // (pp * stages)
        args.num_virtual_stages_per_pipeline_rank = None  # recorded once, as layers per chunk


def _validate_batch(args):
    dp, mbs = args.data_parallel_size, args.micro_batch_size
    _require(mbs > 0, f"--micro-batch-size {mbs} must be positive.")
    # Megatron-LM's words; with a schedule its global batch size is micro x data-parallel
    # (what evaluation then uses), and the schedule sets every training batch
    _require(args.step_batch_size_schedule is None or args.global_batch_size is None,
             "Cannot specify both --step-batch-size-schedule and --global-batch-size: the "
             "schedule sets every global batch size, so drop --global-batch-size "
             f"{args.global_batch_size}.")
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    _require(args.global_batch_size > 0 and args.global_batch_size % (mbs * dp) == 0,
             f"--global-batch-size {args.global_batch_size} is not a multiple of "
             f"--micro-batch-size {mbs} x data-parallel size {dp} = {mbs * dp}.")
    args.num_microbatches = args.global_batch_size // (mbs * dp)
    pp = args.pipeline_model_parallel_size
    if args.virtual_pipeline_model_parallel_size:
        _require(args.num_microbatches % pp == 0,
                 f"the interleaved schedule needs the number of micro-batches "
                 f"({args.num_microbatches} = --global-batch-size {args.global_batch_size} / "
                 f"(--micro-batch-size {mbs} x data-parallel size {dp})) to be a multiple of "
                 f"--pipeline-model-parallel-size {pp}.")
    _validate_train_length(args)
    for name in ("log_interval", "eval_interval"):
        _require(getattr(args, name) > 0, f"{_flag(name)} {getattr(args, name)} must be "
                 "positive.")
    _require(args.eval_iters >= 0, f"--eval-iters {args.eval_iters} must be >= 0.")
    for name in ("save_interval", "exit_interval", "ckpt_keep_last", "exit_duration_in_mins"):
        value = getattr(args, name)
        _require(value is None or value > 0, f"{_flag(name)} {value} must be positive.")
    _require(args.ckpt_step is None or args.ckpt_step >= 0,
             f"--ckpt-step {args.ckpt_step} must be >= 0.")
    _require(args.ckpt_step is None or args.load,
             "--ckpt-step needs --load (the directory to take that iteration from).")
    _require(not args.async_save or args.save,
             "--async-save needs --save (where to write the checkpoints).")
    _require(args.manual_gc_interval >= 0,
             f"--manual-gc-interval {args.manual_gc_interval} must be >= 0.")


_UNIT_WORDS = {"iters": "iterations", "samples": "samples"}


def _validate_train_length(args):
    """--train-iters or --train-samples (Megatron-LM's two ways to say how long to train);
    the learning-rate lengths count in the same unit, and only a run counted in samples may
    ramp up its batch size. Derives train_iters from the samples as Megatron-LM does."""
    by_samples = args.train_samples is not None
    _require(by_samples or args.train_iters is not None,
             "--train-iters (or --train-samples) is required.")
    _require(not (by_samples and args.train_iters is not None),
             "--train-iters and --train-samples were both given; train by one of them.")
    unit, other = ("samples", "iters") if by_samples else ("iters", "samples")
    length = getattr(args, f"train_{unit}")
    _require(length > 0, f"--train-{unit} {length} must be positive.")
    for kind, unset in (("decay", None), ("warmup", 0)):
        value = getattr(args, f"lr_{kind}_{other}")
        _require(value == unset, f"--lr-{kind}-{other} {value} was given with --train-{unit}; "
                 f"a run counted in {_UNIT_WORDS[unit]} counts its learning-rate schedule in "
                 f"{_UNIT_WORDS[unit]} too, so use --lr-{kind}-{unit}.")
    _require(args.rampup_batch_size is None or by_samples,
             "--rampup-batch-size needs --train-samples instead of --train-iters (Megatron-LM "
             "ramps the batch size only in runs counted in samples).")
    _require(args.step_batch_size_schedule is None or by_samples,
             "--step-batch-size-schedule needs --train-samples instead of --train-iters (a "
             "learning-rate schedule counted in iterations assumes one global batch size).")
    try:
        calculator = build_num_microbatches_calculator(
            args.rampup_batch_size, args.global_batch_size, args.micro_batch_size,
            args.data_parallel_size, args.step_batch_size_schedule, args.seq_length)
    except ConfigError as e:
        raise ArgumentError(config_error_to_flags(str(e), args)) from None
    if not by_samples:
        return
    args.train_iters, ramp = train_iters_for_samples(calculator, args.train_samples)
    _require(args.train_iters > 0, f"--train-samples {args.train_samples} is less than one "
             f"global batch (--global-batch-size {args.global_batch_size}).")
    width, pp = args.micro_batch_size * args.data_parallel_size, \
        args.pipeline_model_parallel_size
    flag = "--rampup-batch-size " + " ".join(map(str, args.rampup_batch_size or [])) \
        if args.step_batch_size_schedule is None \
        else f'--step-batch-size-schedule "{args.step_batch_size_schedule}"'
    for size in sorted(set(ramp)):
        _require(size % width == 0, f"{flag} reaches a global batch size of {size}, which is "
                 f"not a multiple of --micro-batch-size {args.micro_batch_size} x "
                 f"data-parallel size {args.data_parallel_size} = {width}.")
        _require(not args.virtual_pipeline_model_parallel_size or (size // width) % pp == 0,
                 f"{flag} reaches {size // width} micro-batches per iteration (global batch "
                 f"size {size}), but the interleaved schedule needs a multiple of "
                 f"--pipeline-model-parallel-size {pp}.")


def _validate_data(args):
    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path]
    sources = sum([bool(args.mock_data), bool(args.data_path), any(p for p in per_split)])
    _require(sources > 0, "No training data: pass --data-path PREFIX (from "
             "tools/preprocess_data.py), --train-data-path/--valid-data-path/--test-data-path, "
             "or --mock-data.")
    _require(sources == 1, "--mock-data, --data-path and the per-split --*-data-path flags "
             "were combined; choose one source of data.")
    _require(args.tokenizer_type is not None,
             f"--tokenizer-type is required; expected one of {', '.join(TOKENIZER_TYPES)}.")
    _require(args.num_workers >= 0, f"--num-workers {args.num_workers} must be >= 0.")
    if args.dataloader_type is None:
        args.dataloader_type = "single"
    _require(args.dataloader_type != "external",
             "--dataloader-type external expects the script's dataset provider to return "
             "ready data loaders, which pretrain() does not support; use single or cyclic.")
    _require(args.ddp_bucket_size is None or args.ddp_bucket_size > 0,
             f"--ddp-bucket-size {args.ddp_bucket_size} must be positive.")
    try:
        args.split_vector = parse_and_normalize_split(args.split)
        args.blend = parse_blend(args.data_path, "data_path") if args.data_path else None
        args.blend_per_split = None
        if any(p for p in per_split):
            args.blend_per_split = [
                parse_blend(words, f"{name}_data_path") if words else None
                for words, name in zip(per_split, ("train", "valid", "test"))]
    except ConfigError as e:
        raise ArgumentError(config_error_to_flags(str(e), args)) from None
    blends = [args.blend] if args.blend else [b for b in args.blend_per_split or [] if b]
    if args.sft:
        _validate_sft(args, blends)
        return
    for prefixes, _ in blends:
        for prefix in prefixes:
            try:
                IndexedDataset(prefix)  # reads the header and checks the pair's sizes
            except DataError as e:
                raise ArgumentError(f"--data-path: {e}") from None
    if args.blend_per_split is not None:
        _require(args.blend_per_split[0] is not None,
                 "--valid-data-path/--test-data-path were given without --train-data-path.")


def _validate_sft(args, blends):
    """--sft reads JSONL conversations: every file must exist; no mock data, no weights."""
    _require(not args.mock_data, "--sft trains on conversations; --mock-data has none (pass "
             "JSONL files with --data-path or --train-data-path).")
    _require(args.tokenizer_type != "NullTokenizer",
             "--sft needs a text tokenizer for its chat template; NullTokenizer reads ids.")
    for paths, weights in blends:
        _require(weights is None, "--sft takes JSONL files without blend weights.")
        for path in paths:
            try:  # every JSONL line checked before anything is built
                open_tokenized(path, check_only=True)
            except SFTDataError as e:
                raise ArgumentError(f"--sft: {e}") from None


def _validate_schedule(args):
    """The schedule's lengths count iterations, or samples under --train-samples."""
    unit = "samples" if args.train_samples is not None else "iters"
    decay, warmup, wsd = (f"lr_{kind}_{unit}" for kind in ("decay", "warmup", "wsd_decay"))
    if getattr(args, decay) is None:
        setattr(args, decay, getattr(args, f"train_{unit}"))
    _require(args.lr_warmup_fraction is None or getattr(args, warmup) == 0,
             f"--lr-warmup-fraction and {_flag(warmup)} were both given; choose one.")
    if args.lr_warmup_fraction is not None:
        _require(0.0 <= args.lr_warmup_fraction <= 1.0,
                 f"--lr-warmup-fraction {args.lr_warmup_fraction} must lie in [0, 1].")
    _require(args.min_lr <= args.lr,
             f"--min-lr {args.min_lr} is above --lr {args.lr}; the schedule decays to min-lr.")
    if args.lr_decay_style == "WSD":
        _require(getattr(args, wsd) is not None,
                 f"--lr-decay-style WSD needs {_flag(wsd)} (the annealing length).")
        _require(0 < getattr(args, wsd) <= getattr(args, decay),
                 f"{_flag(wsd)} {getattr(args, wsd)} must lie in "
                 f"(0, {_flag(decay)} {getattr(args, decay)}].")


def transformer_config_from_args(args) -> TransformerConfig:
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels, num_query_groups=args.num_query_groups,
        norm_placement=args.norm_placement, mix_ln_alpha=args.mix_ln_alpha,
        embedding_norm=args.embedding_norm, normalization=args.normalization,
        norm_epsilon=args.norm_epsilon, qk_layernorm=args.qk_layernorm,
        layernorm_zero_centered_gamma=args.apply_layernorm_1p, gated_linear_unit=args.swiglu,
        add_bias_linear=args.add_bias_linear,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent,
        rope_from_position_ids=getattr(args, "sft", False),
        max_position_embeddings=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, params_dtype=args.params_dtype,
        fp8=fp8_recipe_from_args(args), fp8_param_gather=bool(args.fp8_param_gather),
        transformer_impl=args.transformer_impl,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules, torch_compile=args.torch_compile,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        context_parallel_size=args.context_parallel_size, cp_comm_type=args.cp_comm_type,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        init_seed=args.seed)


def optimizer_config_from_args(args) -> OptimizerConfig:
    return OptimizerConfig(
        lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=args.bf16, fp16=args.fp16, loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer,
        decoupled_lr=getattr(args, "decoupled_lr", None),
        decoupled_min_lr=getattr(args, "decoupled_min_lr", None),
        log_num_zeros_in_grad=getattr(args, "log_num_zeros_in_grad", False))


def exit_with_error(message, prog: str = None, status: int = 2) -> None:
    """Print ``prog: error: message`` once (global rank 0) and exit with ``status`` (2: the
    flags or inputs cannot work; 1: the run stopped itself).

    Every rank finds the same error; the others wait a moment before exiting, because
    torchrun stops all ranks as soon as one exits and rank 0 must get its line out first.
    """
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog or os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr,
              flush=True)
    else:
        time.sleep(3)
    sys.exit(status)
