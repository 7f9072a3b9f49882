"""The one norm builder: every norm in the model is made here."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.config import TransformerConfig


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm over the last dimension with torch's fused forward kernel and a backward of a
    few whole-tensor passes (on CPUs torch differentiates RMSNorm operation by operation,
    three times slower; on GPUs its fused kernels are used instead of this)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        grad32 = grad.float()  # computed in fp32 (no copy for fp32 tensors)
        xhat = x.float() * rstd
        grad_xhat = grad32 * weight.float() if weight is not None else grad32
        # d/dx of x * rstd: rstd * (g - xhat * mean(g * xhat))
        dot = torch.linalg.vecdot(grad_xhat, xhat).unsqueeze(-1) / x.shape[-1]
        grad_x = torch.addcmul(grad_xhat, xhat, dot, value=-1).mul_(rstd).to(x.dtype)
        grad_w = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (grad32 * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: Optional[float]):
    """F.rms_norm over the last dimension; on CPUs with a faster backward (eager only: under
    torch.compile the compiler fuses F.rms_norm with its neighbours)."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if x.device.type == "cpu" and torch.is_grad_enabled() and \
            not torch.compiler.is_compiling():
        return _RMSNormCPU.apply(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm (same parameters and names) with ``rms_norm``'s faster CPU backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LayerNorm1p(nn.LayerNorm):
    """LayerNorm with a zero-centred gain (Megatron's --apply-layernorm-1p): the stored
    ``weight`` starts at zero and the norm scales by (1 + weight)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.weight is not None:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class RMSNorm1p(nn.RMSNorm):
    """RMSNorm with a zero-centred gain: stored ``weight`` starts at zero, applied as
    (1 + weight)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.weight is not None:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight + 1, self.eps)


def build_norm(config: TransformerConfig, hidden_size: Optional[int] = None) -> nn.Module:
    """A LayerNorm or RMSNorm over the hidden size (or ``hidden_size``), with its own learnable
    gain, zero-centred under ``layernorm_zero_centered_gamma`` (TransformerEngine's norm under
    ``transformer_impl="transformer_engine"``).

    Under sequence parallelism a hidden-size norm sees only this rank's slice of the sequence,
    so its parameters are marked ``sequence_parallel`` and their gradients are all-reduced
    across the tensor-parallel group before the optimizer step.
    """
    if config.transformer_impl == "transformer_engine":
        from megatron.core.extensions import transformer_engine as te_ext
        return te_ext.norm(config, hidden_size or config.hidden_size)
    if config.normalization == "LayerNorm":
        cls = LayerNorm1p if config.layernorm_zero_centered_gamma else nn.LayerNorm
    else:
        cls = RMSNorm1p if config.layernorm_zero_centered_gamma else RMSNorm
    norm = cls(hidden_size or config.hidden_size, eps=config.norm_epsilon,
               dtype=config.params_dtype)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


def build_qk_norm(config: TransformerConfig) -> nn.Module:
    """The norm of queries or keys over one head's channels (``kv_channels``), shared by all
    heads (megatron-core's q_layernorm / k_layernorm).

    Every tensor-parallel rank holds it whole but applies it to its own heads over the whole
    sequence, so each rank's gradient is the part from its heads: the gradients are summed
    across the tensor-parallel group (``tensor_parallel_partial_grad``), with or without
    sequence parallelism, as megatron-core's finalize_model_grads does for q/k layernorms.
    """
    norm = build_norm(config, config.kv_channels)
    for param in norm.parameters():
        param.sequence_parallel = False
        param.tensor_parallel_partial_grad = True
    return norm


_TE_NORMS = ("LayerNorm", "RMSNorm")


def is_norm(module: nn.Module) -> bool:
    """A norm of ours or TransformerEngine's (not a LayerNormLinear: see ``fused_norm_gain``)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    cls = type(module)
    return cls.__name__ in _TE_NORMS and cls.__module__.startswith("transformer_engine")


def norm_gain(module: nn.Module) -> Optional[torch.Tensor]:
    """The gain a norm multiplies by (1 + weight for the zero-centred variants), or None for a
    norm without one."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    zero_centered = isinstance(module, (LayerNorm1p, RMSNorm1p)) or \
        bool(getattr(module, "zero_centered_gamma", False))
    return weight.detach() + 1 if zero_centered else weight.detach()


def fused_norm_gain(linear: nn.Module) -> Optional[torch.Tensor]:
    """The gain of the norm a TransformerEngine LayerNormLinear computes before its
    projection, or None for a linear layer without one."""
    weight = getattr(linear, "layer_norm_weight", None)
    if weight is None:
        return None
    return weight.detach() + 1 if getattr(linear, "zero_centered_gamma", False) \
        else weight.detach()
