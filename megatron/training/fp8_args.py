"""Megatron-LM's FP8 flags (names and defaults as in its arguments.py) for FP8 without
TransformerEngine (``--transformer-impl local``: megatron/core/fp8.py)."""

from typing import Optional

from megatron.core.fp8 import FP8Recipe


def add_fp8_args(parser) -> None:
    g = parser.add_argument_group("FP8 (torch._scaled_mm, per-tensor scaling)")
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
    if args.fp8_param_gather:
        return "--fp8-param-gather needs TransformerEngine's FP8 weights, which are not " \
               "available yet; drop it (FP8 GEMMs run with --fp8-format alone)."
    if args.fp8_format is None:
        return None
    if args.fp8_amax_history_len < 1:
        return f"--fp8-amax-history-len {args.fp8_amax_history_len} must be at least 1."
    if args.fp8_margin < 0:
        return f"--fp8-margin {args.fp8_margin} must not be negative."
    return None


def fp8_recipe_from_args(args) -> Optional[FP8Recipe]:
    if args.fp8_format is None:
        return None
    return FP8Recipe(format=args.fp8_format, recipe=args.fp8_recipe,
                     amax_history_len=args.fp8_amax_history_len,
                     amax_compute_algo=args.fp8_amax_compute_algo, margin=args.fp8_margin)
