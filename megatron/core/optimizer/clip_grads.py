"""Gradient norm over all model shards, and clipping by it."""

from typing import List

import torch
import torch.distributed as dist


def get_grad_norm_fp32(grads: List[torch.Tensor], model_parallel_group=None) -> float:
    """L2 norm of ``grads``, summed in fp32 over the model-parallel group (tensor x pipeline).

    ``grads`` must hold each parameter once across that group: callers leave out the copies
    that tensor-parallel ranks > 0 hold of replicated parameters.
    """
    if grads:
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g
                                     for g in grads])
        total_sq = torch.stack(norms).square().sum()
    else:  # nothing here to count, but the all-reduce needs this rank's zero on its device
        nccl = model_parallel_group is not None and \
            dist.get_backend(model_parallel_group) == "nccl"
        total_sq = torch.zeros((), device="cuda" if nccl else "cpu")
    if model_parallel_group is not None and dist.get_world_size(model_parallel_group) > 1:
        dist.all_reduce(total_sq, group=model_parallel_group)
    return float(total_sq.sqrt())


def count_zeros_fp32(grads: List[torch.Tensor], group=None) -> int:
    """Zero elements in ``grads``, summed over ``group``; like ``get_grad_norm_fp32``, the
    caller passes each parameter once across that group."""
    device = grads[0].device if grads else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total = torch.zeros((), dtype=torch.int64, device=device)
    for grad in grads:
        total += grad.numel() - torch.count_nonzero(grad)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return int(total.item())


def clip_grads_by_total_norm(grads: List[torch.Tensor], max_norm: float,
                             total_norm: float) -> None:
    """Scale ``grads`` in place so their global norm is at most ``max_norm``."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)

