"""Everything that must happen to gradients between the last backward and the optimizer."""

from typing import List, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core import parallel_state as ps
from megatron.core.timers import get_timers


def allreduce_sequence_parallel_grads(modules: List[torch.nn.Module]) -> None:
    """Sum the gradients of parameters marked ``sequence_parallel`` (norms, row-parallel
    biases: each rank saw only its slice of the sequence) or ``tensor_parallel_partial_grad``
    (q/k layernorms: each rank saw only its heads) over the tensor-parallel group.
    One flattened all-reduce for all of them."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [p.main_grad if hasattr(p, "main_grad") else p.grad
             for m in modules for p in m.parameters()
             if p.requires_grad and (getattr(p, "sequence_parallel", False) or
                                     getattr(p, "tensor_parallel_partial_grad", False))]
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def shared_embedding_weights(modules):
    """The copies of a tied embedding table held by the first and last pipeline stages."""
    weights = []
    for module in modules:
        get = getattr(module, "shared_embedding_weight", None)
        if get is not None and get() is not None:
            weights.append(get())
    return weights


def allreduce_shared_embedding_grads(modules: List[torch.nn.Module]) -> None:
    """Sum the gradients of the tied embedding's two copies (first and last pipeline stage)
    over the embedding group, so both take the one-process gradient and stay equal."""
    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
        return
    for weight in shared_embedding_weights(modules):
        grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
        dist.all_reduce(grad, group=ps.get_embedding_group())


def sync_shared_embeddings(modules: List[torch.nn.Module]) -> None:
    """Before training: make the last stage's copy of the tied embedding (zeros) equal to the
    first stage's, by an all-reduce over the embedding group."""
    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
        return
    for weight in shared_embedding_weights(modules):
        dist.all_reduce(weight.data, group=ps.get_embedding_group())


def finalize_model_grads(model_chunks, num_tokens: Optional[torch.Tensor] = None) -> None:
    """Data-parallel reduction of each chunk's gradient buffer, the tensor-parallel sum of the
    sequence-parallel (and q/k layernorm) parameters' gradients, and the pipeline sum of the
    tied embedding's."""
    timers = get_timers()
    barrier = timers.barrier_with_L1_time
    timers("all-grads-sync", log_level=1).start(barrier=barrier)
    for chunk in model_chunks:
        chunk.finish_grad_sync()
    timers("all-grads-sync").stop()
    modules = [getattr(c, "module", c) for c in model_chunks]
    timers("layernorm-grads-all-reduce", log_level=1).start(barrier=barrier)
    allreduce_sequence_parallel_grads(modules)
    timers("layernorm-grads-all-reduce").stop()
    timers("embedding-grads-all-reduce", log_level=1).start(barrier=barrier)
    allreduce_shared_embedding_grads(modules)
    timers("embedding-grads-all-reduce").stop()
    if num_tokens is not None:
        scale_gradients_by_global_tokens(model_chunks, num_tokens)


def scale_gradients_by_global_tokens(model_chunks, num_tokens: torch.Tensor) -> None:
    """Megatron-LM's per-token loss normalization: divide every gradient by ``num_tokens``
    (the tokens this rank's last pipeline stage counted, 0 on other stages) summed over the
    pipeline group and then the data (and context) parallel group -- whose reduction summed
    instead of averaging; at least 1, should every token be masked."""
    device = model_chunks[0].grad_buffer.device
    total = torch.as_tensor(num_tokens, dtype=torch.int64).to(device).reshape(())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    if ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    scaling = 1.0 / torch.clamp(total, min=1).to(torch.float32)
    for chunk in model_chunks:
        chunk.scale_gradients(scaling)
