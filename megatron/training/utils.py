"""Printing helpers that know which rank speaks."""

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps


def print_rank_0(message: str) -> None:
    """Print on global rank 0 only."""
    if ps.get_global_rank() == 0:
        print(message, flush=True)


def is_last_rank() -> bool:
    return ps.get_global_rank() == ps.get_world_size() - 1


def print_rank_last(message: str) -> None:
    """Print on the last global rank (a last-pipeline-stage rank, where losses live)."""
    if is_last_rank():
        print(message, flush=True)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def average_losses_across_data_parallel_group(losses):
    """Mean of each loss over the data-parallel group, detached (for reporting only)."""
    averaged = torch.stack([loss.detach().float() for loss in losses])
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(averaged, group=ps.get_data_parallel_group())
        averaged /= ps.get_data_parallel_world_size()
    return averaged
