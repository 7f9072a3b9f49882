"""TensorBoard and Weights & Biases writers, and the scalars Megatron-LM writes to them.

As in Megatron-LM, the last rank (a last-pipeline-stage rank, where the losses live) writes;
the other ranks hold no writer but still take part in the collective timer gathering. Scalar
names, x-axes ("... vs samples" against consumed samples) and switches are Megatron-LM's
(``training_log``, ``evaluate_and_print_results`` and ``Timers.write`` in its
megatron/training/training.py and megatron/core/timers.py). One difference: Megatron-LM sends
scalars to W&B only when ``--tensorboard-dir`` is set as well; here ``--wandb-project`` alone
is enough.
"""

import math
import os
import resource

import torch

from megatron.core.timers import Timers, get_timers, set_timers
from megatron.training.utils import is_last_rank

_TENSORBOARD = None
_WANDB = None

# The timers training_log prints at each level (Megatron-LM's list, for the phases built here).
TIMERS_TO_LOG = {
    1: ["forward-backward", "layernorm-grads-all-reduce", "embedding-grads-all-reduce",
        "all-grads-sync", "params-all-gather", "optimizer-copy-to-main-grad",
        "optimizer-clip-main-grad", "optimizer-count-zeros", "optimizer-inner-step",
        "optimizer-copy-main-to-model-params", "optimizer"],
    2: ["batch-generator", "forward-compute", "backward-compute", "forward-recv",
        "forward-send", "backward-recv", "backward-send", "forward-send-forward-recv",
        "forward-send-backward-recv", "backward-send-forward-recv",
        "backward-send-backward-recv"],
}


def get_tensorboard_writer():
    """The run's ``torch.utils.tensorboard.SummaryWriter`` on the last rank, else None."""
    return _TENSORBOARD


def get_wandb_writer():
    """The ``wandb`` module (after ``wandb.init``) on the last rank, else None."""
    return _WANDB


def set_log_writers(args) -> None:
    """The run's timers (every rank) and, on the last rank, the writers the flags ask for.
    The flags were checked (packages present) by validate_args."""
    global _TENSORBOARD, _WANDB
    set_timers(Timers(args.timing_log_level, args.timing_log_option, args.barrier_with_L1_time))
    if not is_last_rank():
        return
    if args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter
        print("> setting tensorboard ...", flush=True)
        _TENSORBOARD = SummaryWriter(log_dir=args.tensorboard_dir,
                                     max_queue=args.tensorboard_queue_size)
    if args.wandb_project:
        import wandb
        save_dir = args.wandb_save_dir or os.path.join(args.save, "wandb")
        os.makedirs(save_dir, exist_ok=True)
        kwargs = {"dir": save_dir, "name": args.wandb_exp_name, "project": args.wandb_project,
                  "config": _plain_config(args)}
        if args.wandb_entity:
            kwargs["entity"] = args.wandb_entity
        wandb.init(**kwargs)
        _WANDB = wandb


def _plain_config(args) -> dict:
    plain = (bool, int, float, str, type(None), list, tuple, dict)
    return {k: v if isinstance(v, plain) else str(v) for k, v in vars(args).items()}


def close_log_writers() -> None:
    """Flush and close the writers (end of pretrain); the timers go back to level 0."""
    global _TENSORBOARD, _WANDB
    if _TENSORBOARD is not None:
        _TENSORBOARD.flush()
        _TENSORBOARD.close()
    if _WANDB is not None:
        _WANDB.finish()
    _TENSORBOARD = _WANDB = None
    set_timers(Timers(0))


def _add(name, value, iteration, samples=None, wandb=True) -> None:
    """``name`` against the iteration (and ``name vs samples`` against consumed samples) in
    TensorBoard; ``name`` in W&B."""
    if _TENSORBOARD is not None:
        _TENSORBOARD.add_scalar(name, value, iteration)
        if samples is not None:
            _TENSORBOARD.add_scalar(name + " vs samples", value, samples)
    if _WANDB is not None and wandb:
        _WANDB.log({name: value}, iteration)


def write_scalars(scalars: dict, iteration: int) -> None:
    """Many scalars of one iteration (None values left out): TensorBoard and one W&B log."""
    scalars = {k: v for k, v in scalars.items() if v is not None}
    if _TENSORBOARD is not None:
        for name, value in scalars.items():
            _TENSORBOARD.add_scalar(name, value, iteration)
    if _WANDB is not None and scalars:
        _WANDB.log(scalars, iteration)


class _BothWriters:
    """``add_scalar`` to TensorBoard and W&B alike (what ``Timers.write`` writes to)."""

    def add_scalar(self, name, value, iteration):
        _add(name, value, iteration)


def write_training_scalars(args, iteration, batch_size, losses, learning_rate, loss_scale,
                           grad_norm, params_norm=None, num_zeros=None) -> None:
    """Every --tensorboard-log-interval iterations: this iteration's scalars (last rank)."""
    if (_TENSORBOARD is None and _WANDB is None) or iteration % args.tensorboard_log_interval:
        return
    samples = args.consumed_train_samples
    if _WANDB is not None:
        _WANDB.log({"samples vs steps": samples}, iteration)
    if args.log_learning_rate_to_tensorboard:
        _add("learning-rate", learning_rate, iteration, samples)
    _add("batch-size", batch_size, iteration, samples)
    for key, value in losses.items():
        _add(key, float(value), iteration, samples)
    if args.log_loss_scale_to_tensorboard:
        _add("loss-scale", loss_scale, iteration, samples)
    if args.log_world_size_to_tensorboard:
        _add("world-size", args.world_size, iteration, samples)
    for name, value in (("grad-norm", grad_norm), ("num-zeros", num_zeros),
                        ("params-norm", params_norm)):
        if value is not None:
            _add(name, value, iteration, samples)
    if args.log_memory_to_tensorboard:
        for name, value in memory_stats().items():
            _add(name, value, iteration, wandb=False)


def memory_stats() -> dict:
    """Megatron-LM's four CUDA allocator statistics. On a CPU, where torch keeps no allocator
    statistics, the process's resident memory: "mem-reserved-bytes" is the current resident
    set (/proc/self/statm), "mem-max-allocated-bytes" its peak (getrusage ru_maxrss)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats = torch.cuda.memory_stats()
        return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
                "mem-allocated-bytes": stats["allocated_bytes.all.current"],
                "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
                "mem-allocated-count": stats["allocation.all.current"]}
    out = {"mem-max-allocated-bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/statm") as f:
            out["mem-reserved-bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is all there is
        pass
    return out


def log_interval_timers(args, iteration, seconds_per_iteration, throughput) -> None:
    """At each log line: iteration time and throughput (with --log-timers-to-tensorboard),
    then the timers of --timing-log-level, written and printed. Collective: every rank."""
    timers = get_timers()
    names = [n for level in range(1, args.timing_log_level + 1) for n in TIMERS_TO_LOG[level]]
    if args.log_timers_to_tensorboard:
        _add("iteration-time", seconds_per_iteration, iteration)
        if args.log_throughput:
            _add("throughput", throughput, iteration)
        timers.write(names, _BothWriters(), iteration, normalizer=args.log_interval,
                     reset=False)
    timers.log(names, normalizer=args.log_interval)


def write_validation_scalars(args, iteration, losses) -> None:
    """``<loss> validation`` (and ``... ppl`` with --log-validation-ppl-to-tensorboard), as
    Megatron-LM writes them after each evaluation (the test set's too, under the same tag)."""
    for key, value in losses.items():
        ppl = math.exp(min(20.0, value))
        _add(f"{key} validation", value, iteration, args.consumed_train_samples)
        if args.log_validation_ppl_to_tensorboard:
            _add(f"{key} validation ppl", ppl, iteration, args.consumed_train_samples,
                 wandb=False)
