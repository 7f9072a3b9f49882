"""Forward/backward schedules over the micro-batches of one global batch.

A schedule calls ``forward_step_func(data_iterator, model)``, which returns the model's
output and a ``loss_func`` mapping that output to ``(loss, {name: value to report})``; the
loss is divided by the number of micro-batches (gradient accumulation averages them) and
scaled by ``grad_scale_func`` (the fp16 loss scale) before backward.

A loss function may instead return Megatron-LM's ``(loss sum, number of tokens, {name:
[sum, count]})``. The sum is then divided by its tokens and the number of micro-batches --
unless ``calculate_per_token_loss``: then it stays a sum, the tokens are counted over the
micro-batches and ``finalize_model_grads_func(model_chunks, num_tokens)`` divides the
gradients by the global count (so micro-batches weigh by their tokens).
"""

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.autograd import Variable

from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel.p2p_communication import PipelineP2P
from megatron.core.timers import get_timers


def _loss_for_backward(outputs, num_microbatches: int, calculate_per_token_loss: bool):
    """(loss to backward, tokens it covers, reported values) from a loss function's return."""
    if len(outputs) == 3:
        loss, num_tokens, values = outputs
        if not calculate_per_token_loss:
            loss = loss / torch.clamp(num_tokens, min=1) / num_microbatches
        return loss, num_tokens, values
    loss, values = outputs
    return loss / num_microbatches, 0, values


def _finalize(finalize_model_grads_func, chunks, num_tokens, calculate_per_token_loss):
    if finalize_model_grads_func is not None:
        finalize_model_grads_func(chunks, num_tokens if calculate_per_token_loss else None)


def forward_backward_no_pipelining(*, forward_step_func: Callable, data_iterator, model,
                                   num_microbatches: int, forward_only: bool = False,
                                   grad_scale_func: Optional[Callable] = None,
                                   tensor_shape=None, dtype=None,
                                   calculate_per_token_loss: bool = False,
                                   finalize_model_grads_func: Optional[Callable] = None
                                   ) -> List[Dict[str, torch.Tensor]]:
    """Run every micro-batch through the whole model, accumulating gradients.

    All micro-batches but the last run under ``model.no_sync()`` (when the model has it), so
    overlapped data-parallel reduction starts only during the last backward. Returns the
    reported values of each micro-batch; finishing the reduction is left to the caller, or to
    ``finalize_model_grads_func([model], num_tokens or None)`` when given.
    """
    if isinstance(model, list):  # one model chunk without pipelining
        model, data_iterator = model[0], data_iterator[0]
    reported, num_tokens = [], 0  # a tensor on the loss's device once a count comes
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    timers = get_timers()
    for i in range(num_microbatches):
        with no_sync() if i < num_microbatches - 1 else contextlib.nullcontext():
            timers("forward-compute", log_level=2).start()
            output, loss_func = forward_step_func(data_iterator, model)
            loss, tokens, values = _loss_for_backward(loss_func(output), num_microbatches,
                                                      calculate_per_token_loss)
            timers("forward-compute").stop()
            num_tokens = num_tokens + tokens
            if not forward_only:
                if grad_scale_func is not None:
                    loss = grad_scale_func(loss)
                timers("backward-compute", log_level=2).start()
                loss.backward()
                timers("backward-compute").stop()
        reported.append(values)
    if not forward_only:
        _finalize(finalize_model_grads_func, [model], num_tokens, calculate_per_token_loss)
    return reported


def get_forward_backward_func() -> Callable:
    """The schedule for this rank's pipeline layout: no pipelining when the pipeline size is
    1, else 1F1B or interleaved (chosen by the number of model chunks passed)."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        return forward_backward_pipelining
    return forward_backward_no_pipelining


def one_f_one_b_order(pp_size: int, pp_rank: int, num_microbatches: int,
                      forward_only: bool = False) -> List[Tuple[str, int, int]]:
    """This stage's steps under 1F1B: (kind "F"/"B", model chunk, micro-batch). Warm-up
    forwards (one fewer per later stage), then alternate one forward and one backward, then
    the remaining backwards -- so at most pp_size micro-batches are in flight on stage 0."""
    if forward_only:
        return [("F", 0, i) for i in range(num_microbatches)]
    warmup = min(pp_size - pp_rank - 1, num_microbatches)
    steps = [("F", 0, i) for i in range(warmup)]
    for i in range(num_microbatches - warmup):
        steps += [("F", 0, warmup + i), ("B", 0, i)]
    return steps + [("B", 0, i) for i in range(num_microbatches - warmup, num_microbatches)]


def interleaved_order(pp_size: int, pp_rank: int, vp_size: int, num_microbatches: int,
                      forward_only: bool = False) -> List[Tuple[str, int, int]]:
    """Megatron-LM's interleaved schedule: micro-batches go through the model chunks in
    groups of pp_size; (pp_size - rank - 1) * 2 + (vp_size - 1) * pp_size warm-up forwards,
    then 1F1B over (chunk, micro-batch) pairs, then the remaining backwards."""
    total, group = num_microbatches * vp_size, pp_size * vp_size

    def step(kind, k):
        chunk = (k % group) // pp_size
        return (kind, chunk if kind == "F" else vp_size - 1 - chunk,
                (k // group) * pp_size + k % pp_size)
    forwards = [step("F", k) for k in range(total)]
    if forward_only:
        return forwards
    backwards = [step("B", k) for k in range(total)]
    warmup = total if num_microbatches == pp_size else \
        min((pp_size - pp_rank - 1) * 2 + (vp_size - 1) * pp_size, total)
    steps = forwards[:warmup]
    for k in range(total - warmup):
        steps += [forwards[warmup + k], backwards[k]]
    return steps + backwards[total - warmup:]


def _backward(output: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
    """Backward from an output whose data may have been freed after sending (only its graph
    is needed), so the engine is called without torch.autograd's shape check."""
    if grad is None:
        output.backward()
        return
    Variable._execution_engine.run_backward((output,), (grad,), False, False, (), True, True)


def forward_backward_pipelining(*, forward_step_func: Callable, data_iterator, model,
                                num_microbatches: int, tensor_shape: Tuple[int, ...],
                                dtype: torch.dtype, forward_only: bool = False,
                                grad_scale_func: Optional[Callable] = None,
                                calculate_per_token_loss: bool = False,
                                finalize_model_grads_func: Optional[Callable] = None
                                ) -> List[Dict[str, torch.Tensor]]:
    """1F1B (one model chunk) or the interleaved schedule (a list of chunks, and one data
    iterator per chunk) over the pipeline group.

    ``tensor_shape`` is what stages exchange: [seq / tp under sequence parallelism, micro
    batch, hidden]. Returns the last stage's reported values per micro-batch (empty on other
    stages). Each chunk's overlapped gradient reduction is allowed only during the backward
    of its last micro-batch. ``finalize_model_grads_func(chunks, num_tokens or None)``, when
    given, runs after the last backward (tokens are counted on the last stage only).
    """
    chunks = model if isinstance(model, list) else [model]
    iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
    pp_size, pp_rank, vp = (ps.get_pipeline_model_parallel_world_size(),
                            ps.get_pipeline_model_parallel_rank(), len(chunks))
    if vp > 1 and num_microbatches % pp_size:
        raise ValueError(f"the interleaved schedule needs a number of micro-batches "
                         f"({num_microbatches}) divisible by the pipeline size ({pp_size})")
    steps = interleaved_order(pp_size, pp_rank, vp, num_microbatches, forward_only) if vp > 1 \
        else one_f_one_b_order(pp_size, pp_rank, num_microbatches, forward_only)
    device = next(chunks[0].parameters()).device
    p2p = PipelineP2P(tensor_shape, dtype, device)
    is_first = lambda c: pp_rank == 0 and c == 0  # noqa: E731
    is_last = lambda c: pp_rank == pp_size - 1 and c == vp - 1  # noqa: E731

    def recv_of(step):
        kind, chunk, i = step
        if (kind == "F" and not is_first(chunk)) or (kind == "B" and not is_last(chunk)):
            return (step, kind == "F")
        return None

    for chunk in chunks:
        if hasattr(chunk, "enable_grad_sync"):
            chunk.enable_grad_sync(False)
    inputs, outputs, reported = {}, {}, []
    num_tokens = 0  # a tensor on the loss's device once a count comes
    timers = get_timers()
    p2p.post(recv=recv_of(steps[0]) if steps else None)
    for j, step in enumerate(steps):
        kind, chunk, i = step
        received = p2p.wait_recv(step) if recv_of(step) else None
        send = None
        ps.set_virtual_pipeline_model_parallel_rank(chunk if vp > 1 else None)
        if kind == "F":
            if received is not None and not forward_only:
                received.requires_grad_()
            chunks[chunk].set_input_tensor(received)
            timers("forward-compute", log_level=2).start()
            with torch.no_grad() if forward_only else contextlib.nullcontext():
                output, loss_func = forward_step_func(iterators[chunk], chunks[chunk])
                if is_last(chunk):
                    output, tokens, values = _loss_for_backward(
                        loss_func(output), num_microbatches, calculate_per_token_loss)
                    num_tokens = num_tokens + tokens
                    reported.append(values)
                else:
                    send = (output, True)
            timers("forward-compute").stop()
            if not forward_only:
                inputs[(chunk, i)], outputs[(chunk, i)] = received, output
        else:
            x, output = inputs.pop((chunk, i)), outputs.pop((chunk, i))
            if i == num_microbatches - 1 and hasattr(chunks[chunk], "enable_grad_sync"):
                chunks[chunk].enable_grad_sync(True)
            if received is None and grad_scale_func is not None:
                output = grad_scale_func(output)
            timers("backward-compute", log_level=2).start()
            _backward(output, received)
            timers("backward-compute").stop()
            if not is_first(chunk):
                send = (x.grad, False)
        p2p.post(send=send, recv=recv_of(steps[j + 1]) if j + 1 < len(steps) else None)
        if send is not None and kind == "F" and not forward_only:
            # the next stage has the activation now; keep only the graph for backward
            output.data = torch.empty((1,), device=output.device, dtype=output.dtype)
    p2p.finish()
    ps.set_virtual_pipeline_model_parallel_rank(None)
    for chunk in chunks:
        if hasattr(chunk, "enable_grad_sync"):
            chunk.enable_grad_sync(True)
    if not forward_only:
        _finalize(finalize_model_grads_func, chunks, num_tokens, calculate_per_token_loss)
    return reported
