"""Everything that must happen to gradients between the last backward and the optimizer."""

from typing import List

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core import parallel_state as ps


def allreduce_sequence_parallel_grads(modules: List[torch.nn.Module]) -> None:
    """Sum the gradients of parameters marked ``sequence_parallel`` (norms, row-parallel
    biases) over the tensor-parallel group: each rank saw only its slice of the sequence.
    One flattened all-reduce for all of them."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [p.main_grad if hasattr(p, "main_grad") else p.grad
             for m in modules for p in m.parameters()
             if getattr(p, "sequence_parallel", False) and p.requires_grad]
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def finalize_model_grads(model_chunks) -> None:
    """Data-parallel reduction of each chunk's gradient buffer, then the tensor-parallel sum of
    the sequence-parallel parameters' gradients."""
    for chunk in model_chunks:
        chunk.finish_grad_sync()
    allreduce_sequence_parallel_grads([getattr(c, "module", c) for c in model_chunks])
