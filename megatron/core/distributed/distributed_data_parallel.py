"""Gradient accumulation into contiguous buckets, reduced across data-parallel ranks.

Every trainable parameter gets ``param.main_grad``, a view into one flat buffer (fp32 when
the model is bf16/fp16, so micro-batch gradients accumulate without rounding). Parameters are
laid out in reverse order -- roughly the order backward produces their gradients -- and the
buffer is cut into buckets. After autograd accumulates a parameter's gradient, a hook adds it
into ``main_grad``; with ``overlap_grad_reduce``, a bucket whose gradients are all in is
reduced asynchronously while backward continues (on the last micro-batch only).

With the distributed optimizer the parameters also live in one flat buffer of the same
layout, every bucket is padded to a multiple of the data-parallel size, and rank r owns the
r-th slice of each bucket: gradients are reduce-scattered to the owners and the updated
parameters all-gathered back -- with ``overlap_param_gather`` asynchronously, each bucket
waited for by a forward pre-hook of the first module that uses one of its parameters.
"""

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import ConfigError
from megatron.core import parallel_state as ps


@dataclass
class DistributedDataParallelConfig:
    grad_reduce_in_fp32: bool = True
    """Keep main_grad (and reduce it) in fp32 whatever the parameters' dtype."""
    overlap_grad_reduce: bool = False
    """Reduce each bucket as soon as its gradients are ready, during the last backward."""
    use_distributed_optimizer: bool = False
    """Shard gradients (reduce-scatter), optimizer state and master weights over DP ranks."""
    overlap_param_gather: bool = False
    """Distributed optimizer: all-gather updated parameters asynchronously after the step and
    wait for each bucket only when the next forward first uses it."""
    calculate_per_token_loss: bool = False
    """Sum gradients over data-parallel ranks instead of averaging them: the loss is a sum
    over tokens, and finalize_model_grads divides by the global token count."""
    bucket_size: Optional[int] = None
    """Elements per bucket; None: Megatron's default (one bucket unless overlapping, else
    max(40M, 1M x data-parallel size))."""

    def __post_init__(self):
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("overlap_param_gather=True needs use_distributed_optimizer=True "
                              "(only the distributed optimizer all-gathers parameters).")


class _Bucket:
    def __init__(self, start: int, end: int, params: List[nn.Parameter]):
        self.start, self.end, self.params = start, end, params
        self.ready = set()
        self.handle = None  # the asynchronous reduction in flight, if any
        self.reduced = False
        self.param_gather = None  # (handle, input kept alive) of an all-gather in flight


class DistributedDataParallel(nn.Module):
    """Wraps a model. Per step: ``zero_grad_buffer()``, the micro-batches (all but the last
    under ``no_sync()``), then ``finish_grad_sync()``. Collectives use the data-parallel
    group (with the context-parallel ranks: ``ps.get_data_parallel_group(
    with_context_parallel=True)``). ``state_dict`` / ``load_state_dict`` are the wrapped
    module's."""

    def __init__(self, config: DistributedDataParallelConfig, module: nn.Module):
        super().__init__()
        self.module, self.config = module, config
        # context-parallel ranks hold the same parameters (and other tokens): they reduce too
        self.dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        params = [p for p in module.parameters() if p.requires_grad]
        self.params = list(reversed(params))
        device, param_dtype = params[0].device, params[0].dtype
        grad_dtype = torch.float32 if config.grad_reduce_in_fp32 else param_dtype
        self.param_ranges: Dict[nn.Parameter, Tuple[int, int]] = {}
        self.buckets = self._layout(self._bucket_size())
        size = self.buckets[-1].end
        self.grad_buffer = torch.zeros(size, dtype=grad_dtype, device=device)
        self.param_buffer = None
        if config.use_distributed_optimizer:
            self.param_buffer = torch.zeros(size, dtype=param_dtype, device=device)
        self._bucket_of = {}
        for bucket in self.buckets:
            for p in bucket.params:
                start, end = self.param_ranges[p]
                p.main_grad = self.grad_buffer[start:end].view_as(p)
                if self.param_buffer is not None:
                    self.param_buffer[start:end].copy_(p.data.view(-1))
                    p.data = self.param_buffer[start:end].view_as(p)
                self._bucket_of[p] = bucket
                p.register_post_accumulate_grad_hook(self._grad_ready)
        self._sync_enabled = True
        if config.overlap_param_gather:
            for m in module.modules():
                m.register_forward_pre_hook(self._wait_for_params)

    def _bucket_size(self) -> Optional[int]:
        if self.config.bucket_size is not None:
            return self.config.bucket_size
        if self.config.overlap_grad_reduce or self.config.overlap_param_gather:
            return max(40_000_000, 1_000_000 * self.dp_size)
        return None

    def _layout(self, bucket_size: Optional[int]) -> List[_Bucket]:
        """Assign buffer ranges in reverse parameter order; pad buckets for sharding."""
        pad = self.dp_size if self.config.use_distributed_optimizer else 1
        buckets, offset, start, members = [], 0, 0, []
        for p in self.params:
            self.param_ranges[p] = (offset, offset + p.numel())
            offset += p.numel()
            members.append(p)
            if bucket_size is not None and offset - start >= bucket_size:
                offset = -(-offset // pad) * pad
                buckets.append(_Bucket(start, offset, members))
                start, members = offset, []
        if members:
            offset = -(-offset // pad) * pad
            buckets.append(_Bucket(start, offset, members))
        return buckets

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_input_tensor(self, tensor) -> None:
        self.module.set_input_tensor(tensor)

    def enable_grad_sync(self, enabled: bool = True) -> None:
        """Whether backward may start overlapped reductions (only the last micro-batch's)."""
        self._sync_enabled = enabled

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches that are not the last: accumulate only, never start reductions."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    def _grad_ready(self, param: torch.Tensor) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        if self.config.overlap_grad_reduce and self._sync_enabled and self.dp_size > 1:
            bucket = self._bucket_of[param]
            bucket.ready.add(param)
            if len(bucket.ready) == len(bucket.params) and bucket.handle is None:
                self._start_reduction(bucket, async_op=True)

    def _start_reduction(self, bucket: _Bucket, async_op: bool) -> None:
        """Average the bucket over data-parallel ranks: all-reduce it, or with the distributed
        optimizer reduce-scatter it (each rank then holds its slice fully reduced; gloo has no
        reduce-scatter, so there the whole bucket is all-reduced)."""
        view = self.grad_buffer[bucket.start:bucket.end]
        if not self.config.calculate_per_token_loss:
            view.div_(self.dp_size)
        if self.config.use_distributed_optimizer and dist.get_backend(self.dp_group) == "nccl":
            shard = self.shard_range(bucket)
            out = self.grad_buffer[shard[0]:shard[1]]
            bucket.handle = dist.reduce_scatter_tensor(out, view, group=self.dp_group,
                                                       async_op=async_op)
        else:
            bucket.handle = dist.all_reduce(view, group=self.dp_group, async_op=async_op)

    def shard_range(self, bucket: _Bucket) -> Tuple[int, int]:
        """The slice of ``bucket`` this data-parallel rank owns (distributed optimizer)."""
        per_rank = (bucket.end - bucket.start) // self.dp_size
        start = bucket.start + self.dp_rank * per_rank
        return start, start + per_rank

    def zero_grad_buffer(self) -> None:
        self.grad_buffer.zero_()
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.handle, bucket.reduced = None, False

    def finish_grad_sync(self) -> None:
        """Start the reductions not started yet and wait for all (data-parallel group)."""
        if self.dp_size == 1:
            return
        for bucket in self.buckets:
            if bucket.reduced:
                continue
            if bucket.handle is None:
                self._start_reduction(bucket, async_op=False)
            else:
                bucket.handle.wait()
            bucket.handle, bucket.reduced = None, True

    def start_param_sync(self) -> None:
        """After a distributed-optimizer step: every rank's updated slices to every rank
        (data-parallel group). With ``overlap_param_gather`` the all-gathers only start here;
        a bucket is waited for by the forward pre-hook of the first module using it, or by
        ``finish_param_sync``."""
        if self.dp_size == 1:
            return
        self.finish_param_sync()  # never two gathers into one buffer
        for bucket in self.buckets:
            view = self.param_buffer[bucket.start:bucket.end]
            mine = view.chunk(self.dp_size)[self.dp_rank].clone()
            if dist.get_backend(self.dp_group) == "nccl":
                handle = dist.all_gather_into_tensor(view, mine, group=self.dp_group,
                                                     async_op=self.config.overlap_param_gather)
            else:
                handle = dist.all_gather(list(view.chunk(self.dp_size)), mine,
                                         group=self.dp_group,
                                         async_op=self.config.overlap_param_gather)
            if self.config.overlap_param_gather:
                bucket.param_gather = (handle, mine)

    def finish_param_sync(self) -> None:
        """Wait for every parameter all-gather still in flight (data-parallel group); call it
        before reading the parameters outside a forward pass (checkpoints, the optimizer)."""
        for bucket in self.buckets:
            self._finish_param_gather(bucket)

    def _finish_param_gather(self, bucket: _Bucket) -> None:
        if bucket.param_gather is not None:
            bucket.param_gather[0].wait()
            bucket.param_gather = None

    def _wait_for_params(self, module: nn.Module, _inputs) -> None:
        """Forward pre-hook: this module's own parameters must be gathered before it runs."""
        for p in module.parameters(recurse=False):
            bucket = self._bucket_of.get(p)
            if bucket is not None:
                self._finish_param_gather(bucket)

    def scale_gradients(self, factor) -> None:
        """Multiply every accumulated gradient by ``factor`` (a number or 0-dim tensor)."""
        self.grad_buffer.mul_(factor)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)
