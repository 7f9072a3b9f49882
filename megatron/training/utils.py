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
    """Mean of each loss over the data-parallel group, detached (for reporting only). With
    context parallelism each loss must already be its whole sequences' (the same on every
    context-parallel rank): the mean is then taken over data x context parallel ranks."""
    averaged = torch.stack([loss.detach().float() for loss in losses])
    size = ps.get_data_parallel_world_size(with_context_parallel=True)
    if size > 1:
        dist.all_reduce(averaged, group=ps.get_data_parallel_group(with_context_parallel=True))
        averaged /= size
    return averaged


def sum_loss_pairs(values):
    """Sum of per-micro-batch ``[loss sum, token count]`` pairs over the micro-batches and the
    data-parallel group (with the context-parallel ranks, which count other tokens):
    Megatron-LM's per-token loss is ``sum[0] / sum[1]``."""
    total = torch.vstack([v.detach().float().view(-1) for v in values]).sum(dim=0)
    if ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return total


def reduce_losses(reported):
    """{name: loss of the global batch} from each micro-batch's reported values (last pipeline
    stage only): ``[sum, count]`` pairs give the token-weighted mean over micro-batches and
    data-parallel ranks (collective over the data-parallel group), single values (already
    averaged over data-parallel ranks) their mean over micro-batches."""
    losses = {}
    for key in (reported[0] if reported else {}):
        values = [r[key] for r in reported]
        if values[0].numel() == 2:
            total = sum_loss_pairs(values)
            losses[key] = total[0] / total[1]
        else:
            losses[key] = torch.stack(values).mean()
    return losses
