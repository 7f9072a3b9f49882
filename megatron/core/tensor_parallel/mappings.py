"""Autograd-aware collectives over the tensor-parallel group.

Each function is the identity when the tensor-parallel size is 1, so model code calls them
unconditionally. Activations are laid out [sequence, batch, hidden]; sequence parallelism
splits dimension 0 and tensor parallelism splits the last dimension.
"""

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps


def _group_and_size():
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()


def _all_reduce(x):
    group, size = _group_and_size()
    if size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x, dim):
    group, size = _group_and_size()
    if size == 1:
        return x
    return x.chunk(size, dim=dim)[ps.get_tensor_model_parallel_rank()].contiguous()


def _gather(x, dim):
    group, size = _group_and_size()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter_first_dim(x):
    group, size = _group_and_size()
    if size == 1:
        return x
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    # gloo has no reduce-scatter: all-reduce, then keep this rank's slice.
    dist.all_reduce(x, group=group)
    return x.chunk(size, dim=0)[ps.get_tensor_model_parallel_rank()].contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, -1)


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1)


class _ScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, 0)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, 0)


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, to_model_parallel):
        ctx.to_model_parallel = to_model_parallel
        return _gather(x, 0)

    @staticmethod
    def backward(ctx, grad):
        # Entering a tensor-parallel region each rank's gradient is partial: reduce-scatter.
        if ctx.to_model_parallel:
            return _reduce_scatter_first_dim(grad), None
        return _split(grad, 0), None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, 0)


def copy_to_tensor_model_parallel_region(x):
    """Identity forward, all-reduce backward (tensor-parallel group)."""
    return _CopyToRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x):
    """All-reduce forward (tensor-parallel group), identity backward."""
    return _ReduceFromRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x):
    """Keep this rank's slice of the last dimension; gather it back in backward."""
    return _ScatterToRegion.apply(x)


def gather_from_tensor_model_parallel_region(x):
    """All-gather the last dimension (tensor-parallel group); split in backward."""
    return _GatherFromRegion.apply(x)


def scatter_to_sequence_parallel_region(x):
    """Keep this rank's slice of the sequence dimension (tensor-parallel group)."""
    return _ScatterToSequenceParallel.apply(x)


def gather_from_sequence_parallel_region(x, tensor_parallel_output_grad: bool = True):
    """All-gather the sequence dimension (tensor-parallel group).

    Backward reduce-scatters when the gathered tensor feeds a tensor-parallel region (each
    rank holds a partial gradient), and only splits otherwise.
    """
    return _GatherFromSequenceParallel.apply(x, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x):
    """Reduce-scatter the sequence dimension (tensor-parallel group); all-gather backward."""
    return _ReduceScatterToSequenceParallel.apply(x)
