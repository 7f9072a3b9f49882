"""--log-progress: Megatron-LM's ``<save>/progress.txt``, one tab-separated line per event.

    2026-11-30 06:30:00<TAB>Job ID: 1234<TAB># GPUs: 8<TAB>Starting job
    ...<TAB>Saved checkpoint<TAB>Iteration: 100<TAB>Job throughput: 1.2 TFLOP/s/GPU<TAB>
        Cumulative throughput: 1.1 TFLOP/s/GPU<TAB>Floating-point operations: 3.40e+15<TAB>
        Tokens (in billions): 0.03

The floating-point operations are counted as ``--log-throughput`` counts them
(``model_floating_point_operations``) and kept in checkpoints
(``num_floating_point_operations_so_far``), so the count continues on resume; the cumulative
throughput runs from the first "Starting job" line of the current world size, as in
Megatron-LM (megatron/training/training.py, megatron/training/utils/log_utils.py).
"""

import os
import time
from datetime import datetime

import torch.distributed as dist

from megatron.training.utils import barrier

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_job = {"start_time": None, "start_flops": 0.0}  # this job's start (Megatron: _TRAIN_START_TIME)


def append_to_progress_log(save_dir: str, line: str, sync: bool = True) -> None:
    """Append ``line`` after the time, job id and world size (global rank 0 writes; with
    ``sync``, after a barrier of the default group)."""
    if save_dir is None:
        return
    initialized = dist.is_available() and dist.is_initialized()
    if sync and initialized:
        barrier()
    if initialized and dist.get_rank() != 0:
        return
    os.makedirs(save_dir, exist_ok=True)
    world_size = dist.get_world_size() if initialized else 1
    with open(os.path.join(save_dir, "progress.txt"), "a+") as f:
        f.write(f"{datetime.now().strftime(_TIME_FORMAT)}\tJob ID: "
                f"{os.getenv('SLURM_JOB_ID', '')}\t# GPUs: {world_size}\t{line}\n")


def start_job(args, start_time: float) -> None:
    """Write "Starting job" and remember when, with how many FLOPs done (call after loading
    the checkpoint; all ranks of the default group)."""
    _job.update(start_time=start_time, start_flops=args.num_floating_point_operations_so_far,
                per_sequence=None)
    if args.log_progress:
        append_to_progress_log(args.save, "Starting job")


def _field(token: str, kind):
    return kind(token.split(": ")[1])


def start_of_this_world_size(args):
    """(time, FLOPs done) of the earliest "Starting job" since the world size last changed;
    the FLOPs are those of the last checkpoint saved before it (Megatron-LM's
    ``get_start_time_from_progress_log``)."""
    start_time, start_flops, latest_flops, uncommitted = None, None, 0.0, None
    with open(os.path.join(args.save, "progress.txt")) as f:
        for line in f:
            tokens = line.strip().split("\t")
            if tokens[3] == "Saved checkpoint":
                latest_flops = _field(tokens[7], float)
            elif tokens[3] == "Saving async checkpoint":
                uncommitted = _field(tokens[7], float)
            elif tokens[3] == "Saved async checkpoint" and uncommitted is not None:
                latest_flops, uncommitted = uncommitted, None
            if _field(tokens[2], int) != args.world_size:
                start_time = start_flops = None
                continue
            if tokens[3] == "Starting job" and start_time is None:
                start_time, start_flops = tokens[0], latest_flops
    return datetime.strptime(start_time, _TIME_FORMAT), start_flops


def log_checkpoint_saved(args, iteration: int) -> None:
    """The line after a checkpoint (Megatron-LM's
    ``compute_throughputs_and_append_to_progress_log``); all ranks of the default group."""
    if not getattr(args, "log_progress", False) or args.save is None or \
            _job["start_time"] is None:
        return
    if dist.is_available() and dist.is_initialized():
        barrier()
        if dist.get_rank() != 0:
            return
    flops = args.num_floating_point_operations_so_far
    job_seconds = time.time() - _job["start_time"]
    job_throughput = (flops - _job["start_flops"]) / (job_seconds * 10 ** 12 * args.world_size)
    start_time, start_flops = start_of_this_world_size(args)
    elapsed = (datetime.now() - start_time).total_seconds()
    cumulative = (flops - start_flops) / (max(elapsed, 1e-9) * 10 ** 12 * args.world_size)
    tokens = args.consumed_train_samples * args.seq_length
    prefix = "Saving async checkpoint" if args.async_save else "Saved checkpoint"
    append_to_progress_log(
        args.save, sync=False, line=f"{prefix}\tIteration: {iteration}\t"
        f"Job throughput: {job_throughput:.1f} TFLOP/s/GPU\t"
        f"Cumulative throughput: {cumulative:.1f} TFLOP/s/GPU\t"
        f"Floating-point operations: {flops:.2e}\t"
        f"Tokens (in billions): {tokens / 10 ** 9:.2f}")


def count_floating_point_operations(args, batch_size: int) -> None:
    """Add one iteration's FLOPs (``batch_size`` sequences) to the count kept in checkpoints."""
    from megatron.training.flops import model_floating_point_operations
    if _job.get("per_sequence") is None:  # the count is linear in the batch size
        _job["per_sequence"] = model_floating_point_operations(args, 1)
    args.num_floating_point_operations_so_far += _job["per_sequence"] * batch_size
