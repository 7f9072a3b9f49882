"""Gradient accumulation into one contiguous buffer, reduced across data-parallel ranks.

Every trainable parameter gets ``param.main_grad``, a view into a flat buffer (fp32 when the
model is bf16/fp16, so micro-batch gradients accumulate without rounding). After autograd has
accumulated a parameter's gradient, a hook adds it into ``main_grad`` and frees ``.grad``.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state as ps


@dataclass
class DistributedDataParallelConfig:
    grad_reduce_in_fp32: bool = True
    """Keep main_grad (and reduce it) in fp32 whatever the parameters' dtype."""


class DistributedDataParallel(nn.Module):
    """Wraps a model: ``zero_grad_buffer()`` before a step's micro-batches,
    ``finish_grad_sync()`` after them (all-reduces over the data-parallel group and averages).

    ``state_dict`` and ``load_state_dict`` are the wrapped module's, so checkpoints carry no
    wrapper prefix.
    """

    def __init__(self, config: DistributedDataParallelConfig, module: nn.Module):
        super().__init__()
        self.module = module
        params = [p for p in module.parameters() if p.requires_grad]
        dtype = torch.float32 if config.grad_reduce_in_fp32 else params[0].dtype
        # Reverse order: gradients arrive roughly last layer first, so they fill the buffer
        # front to back (what bucketed overlap of the reduction relies on).
        self.params = list(reversed(params))
        self.grad_buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype,
                                       device=params[0].device)
        offset = 0
        for p in self.params:
            p.main_grad = self.grad_buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            p.register_post_accumulate_grad_hook(_accumulate_into_main_grad)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self) -> None:
        self.grad_buffer.zero_()

    def finish_grad_sync(self) -> None:
        """Average gradients over the data-parallel group (no-op with one data-parallel rank)."""
        if ps.get_data_parallel_world_size() > 1:
            self.grad_buffer.div_(ps.get_data_parallel_world_size())
            dist.all_reduce(self.grad_buffer, group=ps.get_data_parallel_group())

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)


def _accumulate_into_main_grad(param: torch.Tensor) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None
