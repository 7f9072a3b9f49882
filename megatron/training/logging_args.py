"""Megatron-LM's logging flags (names and defaults as in its LoggerConfig) and their checks."""

import argparse
import importlib.util
from typing import Optional


def add_logging_args(p) -> None:
    g = p.add_argument_group("logging (TensorBoard, W&B, timers)")
    g.add_argument("--log-params-norm", action="store_true",
                   help="compute and log the L2 norm of all parameters")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="compute and log the number of zeros in the gradients")
    g.add_argument("--log-throughput", action="store_true",
                   help="log model TFLOP/s per device")
    g.add_argument("--timing-log-level", type=int, default=0, choices=range(0, 3),
                   help="0: iteration time only, no overhead; 1: once-per-step phases "
                   "(forward-backward, gradient sync, optimizer); 2: per-micro-batch ones too")
    g.add_argument("--timing-log-option", default="minmax", choices=["max", "minmax", "all"],
                   help="report the max, the (min, max) or every rank's time")
    g.add_argument("--no-barrier-with-level-1-timing", action="store_false",
                   dest="barrier_with_L1_time",
                   help="do not wait for all ranks around level-1 timers")
    g.add_argument("--tensorboard-dir", default=None,
                   help="write TensorBoard events here (from the last rank)")
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="pending events before a write forces a flush to disk")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="also write iteration time, throughput and timers")
    g.add_argument("--no-log-loss-scale-to-tensorboard", action="store_false",
                   dest="log_loss_scale_to_tensorboard")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="CUDA allocator statistics; on CPU the process's resident memory")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true")
    # Older Megatron-LM switches: batch size is always written now; the learning rate unless
    # disabled (Megatron spelled this flag with "learnig"; both spellings are accepted).
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true",
                   help=argparse.SUPPRESS)
    g.add_argument("--no-log-learnig-rate-to-tensorboard", "--no-log-learning-rate-to-tensorboard",
                   action="store_false", dest="log_learning_rate_to_tensorboard",
                   help=argparse.SUPPRESS)
    g.add_argument("--wandb-project", default="",
                   help="log to this Weights & Biases project (from the last rank)")
    g.add_argument("--wandb-exp-name", default="")
    g.add_argument("--wandb-save-dir", default="",
                   help="where W&B writes its files (default: <--save>/wandb)")
    g.add_argument("--wandb-entity", default="")


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def logging_args_error(args) -> Optional[str]:
    """One sentence naming the flag when the logging flags cannot work, else None."""
    if args.tensorboard_log_interval <= 0:
        return f"--tensorboard-log-interval {args.tensorboard_log_interval} must be positive."
    if args.tensorboard_queue_size <= 0:
        return f"--tensorboard-queue-size {args.tensorboard_queue_size} must be positive."
    if args.tensorboard_dir and _missing("tensorboard"):
        return ("--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                "(or pip install -e .[dev]).")
    if args.wandb_project:
        if not args.wandb_exp_name:
            return "--wandb-project needs --wandb-exp-name (the run's name in W&B)."
        if not (args.wandb_save_dir or args.save):
            return "--wandb-project needs --wandb-save-dir or --save (W&B writes to <save>/wandb)."
        if _missing("wandb"):
            return "--wandb-project needs the wandb package: pip install wandb " \
                   "(or pip install -e .[dev])."
    return None
