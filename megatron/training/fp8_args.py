"""Megatron-LM's FP8 flags (names and defaults as in its arguments.py): FP8 GEMMs through
torch._scaled_mm (``--transformer-impl local``: megatron/core/fp8.py) or TransformerEngine's
recipes (``--transformer-impl transformer_engine``: megatron/core/extensions)."""

from typing import Optional

from megatron.core.fp8 import FP8Recipe


def add_fp8_args(parser) -> None:
    g = parser.add_argument_group("FP8 (per-tensor scaling: torch._scaled_mm or TransformerEngine)")
    g.add_argument("--fp8-format", default=None, choices=["e4m3", "hybrid"],
                   help="FP8 GEMMs in the transformer layers: e4m3 everywhere, or hybrid "
                   "(e4m3 forward, e5m2 gradients)")
    g.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise"],
                   help="delayed: scales from the amax history of earlier steps; tensorwise: "
                   "from each tensor's own amax")
    g.add_argument("--fp8-margin", type=int, default=0,
                   help="scale down by 2**margin below the format's maximum")
    g.add_argument("--fp8-amax-history-len", type=int, default=1,
                   help="steps of amax history (delayed recipe)")
    g.add_argument("--fp8-amax-compute-algo", default="most_recent",
                   choices=["most_recent", "max"],
                   help="the amax the delayed scale uses: the last step's or the history's max")
    g.add_argument("--fp8-param-gather", action="store_true",
                   help="keep FP8 copies of the weights (TransformerEngine only)")


def fp8_args_error(args) -> Optional[str]:
    """One sentence when the FP8 flags cannot work, else None."""
    if args.fp8_param_gather and args.fp8_format is None:
        return "--fp8-param-gather needs --fp8-format (it keeps the weights in FP8)."
    if args.fp8_param_gather and args.transformer_impl != "transformer_engine":
        return "--fp8-param-gather needs TransformerEngine's FP8 weights " \
               "(--transformer-impl transformer_engine); drop it to run FP8 GEMMs with the " \
               "local layers."
    if args.fp8_format is None:
        return None
    if args.fp8_amax_history_len < 1:
        return f"--fp8-amax-history-len {args.fp8_amax_history_len} must be at least 1."
    if args.fp8_margin < 0:
        return f"--fp8-margin {args.fp8_margin} must not be negative."
    if args.transformer_impl == "transformer_engine":
        tokens = args.seq_length * args.micro_batch_size // (
            args.tensor_model_parallel_size if args.sequence_parallel else 1)
        if args.hidden_size % 16 or tokens % 16:
            return (f"TransformerEngine's FP8 GEMMs need the hidden size ({args.hidden_size}) "
                    f"and the tokens per rank (--seq-length x --micro-batch-size / sequence-"
                    f"parallel ranks = {tokens}) to be multiples of 16.")
    from megatron.core.extensions.transformer_engine import fp8_device_problem
    return fp8_device_problem()


def fp8_recipe_from_args(args) -> Optional[FP8Recipe]:
    if args.fp8_format is None:
        return None
    return FP8Recipe(format=args.fp8_format, recipe=args.fp8_recipe,
                     amax_history_len=args.fp8_amax_history_len,
                     amax_compute_algo=args.fp8_amax_compute_algo, margin=args.fp8_margin)
