"""Dropout that keeps a 1-byte mask for backward on every device.

torch's CPU kernel keeps its mask in the activation's dtype (2 or 4 bytes an element); on
GPUs it keeps a bool. This one keeps a bool everywhere, so the activation memory of a layer
is what Megatron-LM's accounting says on any machine.
"""

import torch


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x.masked_fill(~keep, 0.0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad.masked_fill(~keep, 0.0).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability ``p`` and scale the rest."""
    if not training or p == 0.0:
        return x
    if x.is_cuda:
        return torch.nn.functional.dropout(x, p, True)
    return _Dropout.apply(x, p)
