"""Megatron-LM's activation recomputation flags (names, defaults and rules as in its
arguments.py) and ``--torch-compile``."""

from typing import Optional

from megatron.core.transformer.config import RECOMPUTE_MODULES


def add_recompute_args(parser) -> None:
    g = parser.add_argument_group("activation recomputation and compilation")
    g.add_argument("--recompute-activations", action="store_true",
                   help="selective recomputation (--recompute-granularity selective)")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"],
                   help="full: keep only the inputs of the recomputed layers; selective: "
                   "recompute the parts named by --recompute-modules")
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"],
                   help="full: uniform recomputes every group of --recompute-num-layers "
                   "layers keeping only its input; block recomputes the first "
                   "--recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="*", default=None,
                   help=f"selective: any of {', '.join(RECOMPUTE_MODULES)} "
                   "(default core_attn)")
    g.add_argument("--torch-compile", action="store_true",
                   help="compile each transformer layer with torch.compile")


def recompute_args_error(args) -> Optional[str]:
    """One sentence when the recomputation flags cannot work together, else None."""
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    granularity = args.recompute_granularity
    if granularity is None:
        if args.recompute_method or args.recompute_num_layers or args.recompute_modules:
            return ("--recompute-method, --recompute-num-layers and --recompute-modules need "
                    "--recompute-granularity (or --recompute-activations).")
        return None
    if granularity == "full":
        if args.recompute_method is None or args.recompute_num_layers is None:
            return ("--recompute-granularity full needs --recompute-method {uniform,block} "
                    "and --recompute-num-layers.")
        if args.recompute_num_layers < 1:
            return f"--recompute-num-layers {args.recompute_num_layers} must be at least 1."
        if args.recompute_modules:
            return "--recompute-modules selects parts for --recompute-granularity selective."
        return None
    if args.recompute_method is not None or args.recompute_num_layers is not None:
        return ("--recompute-method and --recompute-num-layers apply to --recompute-granularity "
                "full; selective recomputation uses --recompute-modules.")
    unknown = [m for m in args.recompute_modules or [] if m not in RECOMPUTE_MODULES]
    if unknown:
        return (f"--recompute-modules {unknown[0]} is not available; choose from "
                f"{', '.join(RECOMPUTE_MODULES)}.")
    return None
