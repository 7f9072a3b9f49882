"""Forward/backward schedules over the micro-batches of one global batch.

A schedule calls ``forward_step_func(data_iterator, model)``, which returns the model's
output and a ``loss_func`` mapping that output to ``(loss, {name: value to report})``; the
loss is divided by the number of micro-batches (gradient accumulation averages them) and
scaled by ``grad_scale_func`` (the fp16 loss scale) before backward.
"""

import contextlib
from typing import Callable, Dict, List, Optional

import torch

from megatron.core import parallel_state as ps


def forward_backward_no_pipelining(*, forward_step_func: Callable, data_iterator, model,
                                   num_microbatches: int, forward_only: bool = False,
                                   grad_scale_func: Optional[Callable] = None
                                   ) -> List[Dict[str, torch.Tensor]]:
    """Run every micro-batch through the whole model, accumulating gradients.

    All micro-batches but the last run under ``model.no_sync()`` (when the model has it), so
    overlapped data-parallel reduction starts only during the last backward. Returns the
    reported values of each micro-batch; finishing the reduction is left to the caller.
    """
    reported = []
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for i in range(num_microbatches):
        with no_sync() if i < num_microbatches - 1 else contextlib.nullcontext():
            output, loss_func = forward_step_func(data_iterator, model)
            loss, values = loss_func(output)
            if not forward_only:
                loss = loss / num_microbatches
                if grad_scale_func is not None:
                    loss = grad_scale_func(loss)
                loss.backward()
        reported.append(values)
    return reported


def get_forward_backward_func() -> Callable:
    """The schedule for this rank's pipeline layout."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("pipeline parallelism is not available yet")
    return forward_backward_no_pipelining
