"""Assemble a whole tensor from its tensor-parallel shards, and split it again."""

from typing import List

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps


def merge_shards(shards: List[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The whole tensor from every rank's shard (in rank order). With ``stride`` > 1 each
    shard holds its share of ``stride`` blocks (e.g. [gate_r; up_r]), re-interleaved here."""
    if stride == 1:
        return torch.cat(shards, dim=dim)
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([p[k] for k in range(stride) for p in pieces], dim=dim)


def split_to_shards(tensor: torch.Tensor, size: int, dim: int, stride: int = 1
                    ) -> List[torch.Tensor]:
    """Inverse of :func:`merge_shards`: the ``size`` shards of a whole tensor."""
    blocks = tensor.chunk(stride, dim=dim)
    per_rank = [b.chunk(size, dim=dim) for b in blocks]
    return [torch.cat([per_rank[k][r] for k in range(stride)], dim=dim) for r in range(size)]


def gather_full_parameter(param: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly tensor-parallel) parameter or gradient, on every rank of
    the tensor-parallel group (all-gather over that group)."""
    size = ps.get_tensor_model_parallel_world_size()
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(size)]
    dist.all_gather(parts, param.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return merge_shards(parts, param.partition_dim, getattr(param, "partition_stride", 1))
