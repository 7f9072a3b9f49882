"""The feed-forward sublayer: linear_fc1 (column-parallel) -> GELU or SwiGLU -> linear_fc2."""

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.recompute import checkpoint_function


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for h = [gate | up], with the gradients of both halves written into one
    tensor shaped like h (autograd's chunk backward would concatenate them: a copy of h per
    layer). The same operations as the unfused form, so the same numbers."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(h, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad):
        h, activated = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_h


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] along the last dimension (under torch.compile the
    plain form, which the compiler fuses with its neighbours, forward and backward)."""
    if torch.compiler.is_compiling():
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(h)


class MLP(nn.Module):
    """With SwiGLU, linear_fc1 holds the gate and up projections stacked [gate; up]; under
    tensor parallelism each rank holds its rows of both (stride 2), so the local chunk(2)
    pairs each gate unit with its own up unit."""

    def __init__(self, config: TransformerConfig, input_norm: bool = False):
        """``input_norm``: TransformerEngine only -- linear_fc1 is a LayerNormLinear that
        computes the layer's pre-MLP norm first."""
        super().__init__()
        self.gated = config.gated_linear_unit
        self.recompute = config.recomputes("mlp")
        self._checkpoint = checkpoint_function(config)
        fc1_size = config.ffn_hidden_size * (2 if self.gated else 1)
        stride = 2 if self.gated else 1
        if config.transformer_impl == "transformer_engine":
            from megatron.core.extensions import transformer_engine as te_ext
            self.linear_fc1 = te_ext.column_parallel_linear(
                config, config.hidden_size, fc1_size, init_method=config.init_method,
                bias=config.add_bias_linear, stride=stride, input_norm=input_norm)
            self.linear_fc2 = te_ext.row_parallel_linear(
                config, config.ffn_hidden_size, config.hidden_size,
                init_method=config.output_layer_init_method, bias=config.add_bias_linear)
            return
        common = dict(bias=config.add_bias_linear, sequence_parallel=config.sequence_parallel,
                      params_dtype=config.params_dtype, fp8=config.fp8)
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, fc1_size,
                                               init_method=config.init_method, stride=stride,
                                               **common)
        self.linear_fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size,
                                            init_method=config.output_layer_init_method, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            return self._checkpoint(self._forward, x)  # keep only x (selective: mlp)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.gated:
            h = swiglu(h)
        else:
            h = F.gelu(h)
        return self.linear_fc2(h)
