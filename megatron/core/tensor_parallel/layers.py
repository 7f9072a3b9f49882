"""Linear and embedding layers split across the tensor-parallel group.

At tensor-parallel size 1 each layer computes exactly what ``torch.nn.Linear`` /
``torch.nn.Embedding`` computes, so model code reads as single-device code.

Weights are initialized whole, with the default RNG (identical on every tensor-parallel
rank), and each rank keeps its slice: a model therefore starts from the same numbers at
every tensor-parallel size, which is what makes parallel runs comparable to one process.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.fp8 import FP8Meta, fp8_linear
from megatron.core.tensor_parallel import mappings


def set_tensor_model_parallel_attributes(param: nn.Parameter, is_parallel: bool, dim: int,
                                         stride: int = 1) -> None:
    """Mark how a parameter is split; optimizers and checkpoint tools read these."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim
    param.partition_stride = stride


def param_is_tensor_parallel_duplicate(param: nn.Parameter) -> bool:
    """True for a parameter every tensor-parallel rank holds whole (count it once)."""
    return not getattr(param, "tensor_model_parallel", False) and \
        ps.get_tensor_model_parallel_rank() > 0


def _init_partition(shape, partition_dim: int, init_method: Callable, stride: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Initialize the whole weight and return this rank's slice of ``partition_dim``.

    With ``stride`` > 1 the weight is made of ``stride`` logical blocks (e.g. SwiGLU's gate
    and up projections) and each rank keeps its share of every block.
    """
    master = torch.empty(shape, dtype=torch.float32)
    init_method(master)
    size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if size > 1:
        per_stride = shape[partition_dim] // (size * stride)
        pieces = torch.split(master, per_stride, dim=partition_dim)
        master = torch.cat(pieces[rank::size], dim=partition_dim)
    return master.to(dtype).contiguous()


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size "
                         f"({denominator}).")
    return numerator // denominator


def _fp8_meta(recipe):
    """The FP8 scaling state of one layer (amaxes maxed over the tensor-parallel group, whose
    ranks hold pieces of the same tensors), or None without FP8."""
    if recipe is None:
        return None
    return FP8Meta(recipe, amax_group=ps.get_tensor_model_parallel_group())


class _SequenceParallelLinear(torch.autograd.Function):
    """all-gather(x) @ W^T + b that keeps only this rank's sequence shard of x for backward
    (the gathered input is rebuilt there): activation memory of a column-parallel layer
    under sequence parallelism is divided by the tensor-parallel size, as in Megatron-LM."""

    @staticmethod
    def forward(ctx, x_shard, weight, bias):
        ctx.save_for_backward(x_shard, weight)
        ctx.has_bias = bias is not None
        return F.linear(mappings._gather(x_shard, 0), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x_shard, weight = ctx.saved_tensors
        x = mappings._gather(x_shard, 0)
        grad_x = mappings._reduce_scatter_first_dim(grad.matmul(weight))
        grad_weight = grad.reshape(-1, grad.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output dimension across tensor-parallel ranks.

    Input: the full activation [s, b, h] (or its sequence shard under sequence parallelism,
    all-gathered here over the tensor-parallel group). Output: this rank's columns
    [s, b, out / tp], or the full output when ``gather_output``.
    """

    def __init__(self, input_size: int, output_size: int, *, init_method: Callable,
                 bias: bool = True, gather_output: bool = False, stride: int = 1,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 skip_weight_param_allocation: bool = False, fp8=None):
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        self.fp8_meta = _fp8_meta(fp8)
        self.output_size_per_partition = _divide(output_size, tp, "output size")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and tp > 1
        if skip_weight_param_allocation:  # the weight is passed to forward (tied embeddings)
            self.register_parameter("weight", None)
        else:
            self.weight = nn.Parameter(_init_partition((output_size, input_size), 0,
                                                       init_method, stride, params_dtype))
            set_tensor_model_parallel_attributes(self.weight, True, 0, stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition,
                                                 dtype=params_dtype))
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        if self.fp8_meta is not None:  # gathered whole under sequence parallelism
            x = mappings.gather_from_sequence_parallel_region(x) if self.sequence_parallel \
                else mappings.copy_to_tensor_model_parallel_region(x)
            y = fp8_linear(x, weight, self.fp8_meta, self.bias, record=self.training)
        elif self.sequence_parallel:
            y = _SequenceParallelLinear.apply(x, weight, self.bias)
        elif ps.get_tensor_model_parallel_world_size() == 1:  # nothing to all-reduce backward
            y = F.linear(x, weight, self.bias)
        else:
            y = F.linear(mappings.copy_to_tensor_model_parallel_region(x), weight, self.bias)
        if self.gather_output:
            y = mappings.gather_from_tensor_model_parallel_region(y)
        return y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input dimension across tensor-parallel ranks.

    Input: this rank's slice of the last dimension. The partial products are all-reduced over
    the tensor-parallel group (reduce-scattered along the sequence under sequence
    parallelism); the bias, held whole by every rank, is added after the reduction.
    """

    def __init__(self, input_size: int, output_size: int, *, init_method: Callable,
                 bias: bool = True, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, fp8=None):
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        self.fp8_meta = _fp8_meta(fp8)
        self.input_size_per_partition = _divide(input_size, tp, "input size")
        self.sequence_parallel = sequence_parallel and tp > 1
        self.weight = nn.Parameter(_init_partition((output_size, input_size), 1, init_method, 1,
                                                   params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype))
            set_tensor_model_parallel_attributes(self.bias, False, 0)
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)

    def _matmul(self, x, bias=None):
        if self.fp8_meta is not None:
            return fp8_linear(x, self.weight, self.fp8_meta, bias, record=self.training)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ps.get_tensor_model_parallel_world_size() == 1:
            return self._matmul(x, self.bias)
        y = self._matmul(x)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = mappings.reduce_from_tensor_model_parallel_region(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across tensor-parallel ranks.

    Each rank looks up the ids in its vocabulary range (others give zeros) and the results are
    all-reduced over the tensor-parallel group. ``reduce=False`` returns the partial sum, for a
    caller that reduce-scatters it instead (sequence parallelism).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: Callable,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        per_partition = _divide(num_embeddings, tp, "padded vocabulary size")
        self.vocab_start_index = rank * per_partition
        self.vocab_end_index = self.vocab_start_index + per_partition
        self.weight = nn.Parameter(_init_partition((num_embeddings, embedding_dim), 0,
                                                   init_method, 1, params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0)

    def forward(self, ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        if ps.get_tensor_model_parallel_world_size() == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local = (ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return mappings.reduce_from_tensor_model_parallel_region(out) if reduce else out
