"""Megatron-LM flags that launch scripts carry: each keeps Megatron-LM's name and default, and
either does what it does there, is a pure speed switch named once at start-up ("no effect
here: ..."), or is a feature this codebase lacks, refused with one sentence.

Sources: Megatron-LM's megatron/training/arguments.py (and the TransformerConfig /
ModelParallelConfig / training config fields its parser is generated from), and the launch
scripts examples/gpt3/train_gpt3_175b_distributed.sh and examples/llama/*.sh.
"""

import argparse
import difflib
import os


class NoEffect(argparse.Action):
    """Stores the value as argparse would, and records the flag for the start-up line."""

    def __init__(self, option_strings, dest, nargs=None, const=None, **kwargs):
        self.flag_only = nargs == 0
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.flag_only else values)
        words = [] if self.flag_only else [str(v) for v in (
            values if isinstance(values, list) else [values])]
        given = list(getattr(namespace, "no_effect_flags", None) or [])
        given.append(" ".join([option_string] + words))
        namespace.no_effect_flags = given


def no_effect_switch(group, flag, **kwargs):
    """A Megatron-LM on/off speed switch (``store_true``) accepted with no effect here."""
    group.add_argument(flag, action=NoEffect, nargs=0, const=True, default=False, **kwargs)


def add_megatron_lm_args(parser):
    """The flags of Megatron-LM's launch scripts and common argument groups that the other
    groups do not define; see the module docstring for the three kinds."""
    g = parser.add_argument_group("Megatron-LM flags (model)")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="legacy spelling of --position-embedding-type rope")
    g.add_argument("--no-position-embedding", dest="add_position_embedding",
                   action="store_false", help="legacy; only valid with rope")
    g.add_argument("--use-rope-scaling", action="store_true")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0)
    g.add_argument("--rotary-seq-len-interpolation-factor", type=int, default=None)
    g.add_argument("--rotary-interleaved", action="store_true")
    for flag in ("--openai-gelu", "--squared-relu", "--quick-geglu"):
        g.add_argument(flag, action="store_true")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--use-torch-fsdp2", action="store_true")
    g.add_argument("--use-megatron-fsdp", action="store_true")
    g.add_argument("--local-rank", type=int, default=None,
                   help="set by old launchers; the rank comes from LOCAL_RANK")

    g = parser.add_argument_group("Megatron-LM flags (optimizer, precision, checkpoints)")
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="peak learning rate of the word embeddings and the output layer")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="their final learning rate (default: --min-lr)")
    g.add_argument("--weight-decay-incr-style", default="constant",
                   choices=["constant", "linear", "cosine"])
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, take the schedule from the flags, not the checkpoint")
    g.add_argument("--use-checkpoint-opt_param-scheduler",
                   "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, take the schedule from the checkpoint, not the flags")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16, accumulate and reduce gradients in bf16 (not fp32)")
    g.add_argument("--ckpt-format", default=None,
                   choices=["torch", "torch_dist", "torch_dcp", "fsdp_dtensor"],
                   help="Megatron-LM's default is torch_dist; checkpoints of either format "
                   "are read, and written in torch format")
    g.add_argument("--use-dist-ckpt", action="store_true",
                   help="legacy spelling of --ckpt-format torch_dist")
    g.add_argument("--auto-detect-ckpt-format", action="store_true",
                   help="always on here: --load reads torch and torch_dist checkpoints")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="exit when --load holds no checkpoint instead of starting fresh")
    g.add_argument("--no-save-optim", action="store_true",
                   help="checkpoints without optimizer state (resume with --no-load-optim)")
    g.add_argument("--no-save-rng", action="store_true",
                   help="checkpoints without RNG state (resumed runs start from --seed)")
    g.add_argument("--save-retain-interval", type=int, default=None,
                   help="after each save, delete the previous checkpoint unless its iteration "
                   "is a multiple of this (a multiple of --save-interval)")
    g.add_argument("--log-progress", action="store_true",
                   help="append job starts, checkpoints, throughput, FLOPs and tokens to "
                   "<save>/progress.txt")
    g.add_argument("--fp16-lm-cross-entropy", action="store_true")
    g.add_argument("--apply-residual-connection-post-layernorm", action="store_true")

    g = parser.add_argument_group("Megatron-LM flags (data)")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="read .bin files with file reads instead of memory maps")
    g.add_argument("--no-create-attention-mask-in-dataloader",
                   dest="create_attention_mask_in_dataloader", action="store_false",
                   help="no document mask from the data (causal attention only)")
    g.add_argument("--tiktoken-pattern", default=None, help="read by TikTokenizer only")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    g.add_argument("--tiktoken-special-tokens", nargs="+", default=None)

    g = parser.add_argument_group("Megatron-LM speed switches (no effect here)")
    g.add_argument("--attention-backend", action=NoEffect, default="auto",
                   choices=["flash", "fused", "unfused", "local", "auto"])
    no_effect_switch(g, "--cross-entropy-loss-fusion")
    g.add_argument("--cross-entropy-fusion-impl", action=NoEffect, default="native",
                   choices=["native", "te"])
    for flag in ("--enable-cuda-graph", "--external-cuda-graph", "--tp-comm-overlap",
                 "--distribute-saved-activations", "--profile",
                 "--use-pytorch-profiler"):
        no_effect_switch(g, flag)
    g.add_argument("--cuda-graph-impl", action=NoEffect, default="none",
                   choices=["none", "local", "transformer_engine"])
    g.add_argument("--cuda-graph-scope", action=NoEffect, nargs="+", default=[])
    g.add_argument("--cuda-graph-warmup-steps", action=NoEffect, type=int, default=3)
    g.add_argument("--tp-comm-overlap-cfg", action=NoEffect, default=None)
    g.add_argument("--empty-unused-memory-level", action=NoEffect, type=int, default=0,
                   choices=[0, 1, 2])
    g.add_argument("--profile-step-start", action=NoEffect, type=int, default=10)
    g.add_argument("--profile-step-end", action=NoEffect, type=int, default=12)
    g.add_argument("--profile-ranks", action=NoEffect, type=int, nargs="+", default=[0])


# Families of Megatron-LM flags for features this codebase lacks: one sentence for the first
# such flag of a command line, instead of "unrecognized".
_REFUSED_FAMILIES = (
    (("--moe-",), "{flag}: mixture of experts is not available here; this codebase trains "
     "dense models (remove the --moe-* and --num-experts flags)."),
    (("--fp8-", "--fp4-", "--first-last-layers-bf16", "--te-"),
     "{flag}: this FP8/FP4 option is not supported here; --fp8-format, --fp8-recipe, "
     "--fp8-margin, --fp8-amax-history-len, --fp8-amax-compute-algo and --fp8-param-gather "
     "are (with --transformer-impl local or transformer_engine)."),
    (("--multi-latent-attention", "--q-lora-rank", "--kv-lora-rank", "--mtp-"),
     "{flag}: multi-latent attention and multi-token prediction are not available here."),
)


def unknown_flag_message(extras, option_strings) -> str:
    """One sentence for the first word argparse could not place: a refusal for a Megatron-LM
    feature family we lack, else the closest known flag."""
    word = next((w for w in extras if w.startswith("-")), extras[0])
    flag = word.split("=", 1)[0]
    for prefixes, sentence in _REFUSED_FAMILIES:
        if flag.startswith(prefixes):
            return sentence.format(flag=flag)
    if not flag.startswith("-"):
        return f"Unrecognized argument {flag!r} (a value without a flag)."
    close = difflib.get_close_matches(flag, [o for o in option_strings if o.startswith("--")],
                                      n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "."
    return f"Unrecognized argument {flag}{hint}"


def _refuse(condition: bool, message: str) -> None:
    if condition:
        from megatron.training.arguments import ArgumentError
        raise ArgumentError(message)


def validate_megatron_lm_args(args) -> None:
    """Apply the legacy spellings and refuse what this codebase lacks (one sentence each)."""
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    _refuse(not args.add_position_embedding and args.position_embedding_type != "rope",
            "--no-position-embedding is deprecated, use --position-embedding-type (it is "
            "accepted only with rope, which has no learned position table).")
    _refuse(args.position_embedding_type not in ("learned_absolute", "rope"),
            f"--position-embedding-type {args.position_embedding_type} is not available "
            "here; use learned_absolute or rope.")
    _refuse(args.use_rope_scaling or args.rotary_seq_len_interpolation_factor is not None,
            "RoPE scaling (--use-rope-scaling, --rotary-seq-len-interpolation-factor) is not "
            "available yet; remove it to train with plain rope.")
    _refuse(args.rotary_interleaved, "--rotary-interleaved is not available here; rope "
            "rotates the two halves of each head (Megatron-LM's default).")
    for flag in ("openai_gelu", "squared_relu", "quick_geglu"):
        _refuse(getattr(args, flag), f"--{flag.replace('_', '-')} is not available here; "
                "the MLP uses GeLU, or SwiGLU with --swiglu.")
    _refuse(args.num_experts is not None or args.expert_model_parallel_size != 1,
            "--num-experts/--expert-model-parallel-size: mixture of experts is not available "
            "here; this codebase trains dense models.")
    _refuse(args.use_torch_fsdp2 or args.use_megatron_fsdp,
            "--use-torch-fsdp2/--use-megatron-fsdp: FSDP is not available here; use "
            "--use-distributed-optimizer (ZeRO-1) to shard the optimizer state.")
    if args.decoupled_lr is not None:
        low = args.min_lr if args.decoupled_min_lr is None else args.decoupled_min_lr
        _refuse(not 0.0 <= low <= args.decoupled_lr,
                f"--decoupled-min-lr {low} must lie in [0, --decoupled-lr {args.decoupled_lr}] "
                "(without --decoupled-min-lr, --min-lr is used).")
    _validate_weight_decay(args)
    _refuse(args.fp16_lm_cross_entropy, "--fp16-lm-cross-entropy is not available here; the "
            "LM cross entropy is computed in fp32 (Megatron-LM's default without the flag).")
    _refuse(args.apply_residual_connection_post_layernorm,
            "--apply-residual-connection-post-layernorm is not available here; choose where "
            "the block's norms sit with --norm-placement (pre, post, peri, mix).")
    _refuse(args.save_retain_interval is not None and not (
        args.save_interval and args.save_retain_interval > 0
        and args.save_retain_interval % args.save_interval == 0),
            f"--save-retain-interval {args.save_retain_interval} must be a positive multiple "
            f"of --save-interval {args.save_interval}.")
    _refuse(args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler,
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler were "
            "both given; choose one.")
    if args.use_dist_ckpt and args.ckpt_format is None:
        args.ckpt_format = "torch_dist"
    _refuse(args.ckpt_format in ("torch_dcp", "fsdp_dtensor"),
            f"--ckpt-format {args.ckpt_format} is not available here; use torch (torch_dist "
            "checkpoints are read as well).")
    args.ckpt_format_given = args.ckpt_format
    if args.ckpt_format is None:
        args.ckpt_format = "torch_dist"  # Megatron-LM's default; loading detects either


def _validate_weight_decay(args) -> None:
    """Megatron-LM: constant style takes --weight-decay; the others need start and end."""
    if args.weight_decay_incr_style == "constant":
        _refuse(args.start_weight_decay is not None or args.end_weight_decay is not None,
                "--start-weight-decay/--end-weight-decay need --weight-decay-incr-style "
                "linear or cosine (constant uses --weight-decay).")
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
        return
    _refuse(args.start_weight_decay is None or args.end_weight_decay is None,
            f"--weight-decay-incr-style {args.weight_decay_incr_style} needs "
            "--start-weight-decay and --end-weight-decay.")
    _refuse(not 0.0 <= args.start_weight_decay <= args.end_weight_decay,
            f"--start-weight-decay {args.start_weight_decay} must lie in [0, "
            f"--end-weight-decay {args.end_weight_decay}]; weight decay only increases.")


def startup_notes(args) -> list:
    """The lines to print once at start-up: the no-effect flags given, the checkpoint format."""
    notes = []
    given = getattr(args, "no_effect_flags", None)
    if given:
        notes.append("no effect here: " + ", ".join(given))
    if args.save and getattr(args, "ckpt_format_given", None) == "torch_dist":
        notes.append("note: --ckpt-format torch_dist: torch_dist checkpoints are read, but "
                     "checkpoints are written in torch format (Megatron-LM loads them with "
                     "--ckpt-format torch).")
    return notes


def print_startup_notes(args) -> None:
    """Print ``startup_notes`` once, from global rank 0 (before process groups exist)."""
    if int(os.environ.get("RANK", "0")) == 0:
        for line in startup_notes(args):
            print(line, flush=True)
