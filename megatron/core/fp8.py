"""FP8 matrix multiplication without TransformerEngine: ``torch._scaled_mm`` with per-tensor
scaling, in the recipes TransformerEngine names.

A linear layer's three GEMMs each take two FP8 operands: forward ``y = x W^T`` (input and
weight), backward ``dx = dy W`` and ``dW = dy^T x`` (the output gradient with the weight or
the input). Each operand is multiplied by its scale, saturated to the format's largest value
and cast; ``torch._scaled_mm`` multiplies in FP8 and accumulates and returns in higher
precision, undoing the scales. Formats: ``e4m3`` everywhere, or ``hybrid``: e4m3 forward,
e5m2 (more range, less precision) for the output gradient.

Scaling (``scale = fp8_max / amax / 2**margin``, where amax is the largest |value|):

- ``tensorwise`` (TransformerEngine's current scaling): from the tensor's own amax, every GEMM;
- ``delayed``: from the amax history of the previous steps (its max, or its most recent entry),
  so the GEMM needs no reduction before it runs; each use records this rank's amax into the
  current slot, and ``fp8_step`` (once per optimizer step) maxes those over the ranks with one
  all-reduce per group for all layers, rolls the histories and computes the next scales.
  TransformerEngine's DelayedScaling does the same.

An amax of zero or infinity leaves the scale unchanged. ``amax_group``: the process group
over which amaxes are maxed (the tensor-parallel group, whose ranks hold pieces of one
logical tensor: at each GEMM for ``tensorwise``, at the step for ``delayed``), so every rank
scales alike and results match one process.

Each quantization also counts saturated elements (|x| x scale above the format's maximum) and
underflows (non-zero elements that become zero), for the layer statistics.

``--fp8-format`` (with ``--transformer-impl local``) puts an ``FP8Meta`` in each column- and
row-parallel linear layer of the transformer layers; the training loop calls ``fp8_step``
after each optimizer step.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import ConfigError

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
ROLES = ("input", "weight", "grad_output")


@dataclass
class FP8Recipe:
    """--fp8-format, --fp8-recipe, --fp8-amax-history-len, --fp8-amax-compute-algo,
    --fp8-margin (Megatron-LM's flags and defaults)."""

    format: str = "hybrid"
    recipe: str = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0

    def __post_init__(self):
        if self.format not in ("e4m3", "hybrid"):
            raise ConfigError(f"fp8 format={self.format} must be e4m3 or hybrid.")
        if self.recipe not in ("delayed", "tensorwise"):
            raise ConfigError(f"fp8 recipe={self.recipe} must be delayed or tensorwise.")
        if self.amax_history_len < 1:
            raise ConfigError(f"fp8 amax_history_len={self.amax_history_len} must be at least 1.")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ConfigError(f"fp8 amax_compute_algo={self.amax_compute_algo} must be max or "
                              "most_recent.")
        if self.margin < 0:
            raise ConfigError(f"fp8 margin={self.margin} must not be negative.")

    def dtype(self, role: str) -> torch.dtype:
        return E5M2 if self.format == "hybrid" and role == "grad_output" else E4M3


def scale_from_amax(amax: torch.Tensor, fp8_max: float, margin: int,
                    previous: torch.Tensor) -> torch.Tensor:
    """fp8_max / amax / 2**margin; ``previous`` where amax is zero or not finite."""
    scale = (fp8_max / amax) / (2.0 ** margin)
    keep = (amax <= 0) | ~torch.isfinite(amax)
    return torch.where(keep, previous, scale)


def _amax(x: torch.Tensor, group) -> torch.Tensor:
    amax = x.detach().abs().amax().float()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


class ScalingState:
    """The scale of one operand of one layer (one role), with its amax history."""

    def __init__(self, recipe: FP8Recipe, role: str, device=None):
        self.recipe, self.role = recipe, role
        self.dtype = recipe.dtype(role)
        self.fp8_max = FP8_MAX[self.dtype]
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self.history = torch.zeros(recipe.amax_history_len, dtype=torch.float32, device=device)
        self.counting = False  # count saturations and underflows (a host sync per GEMM)
        self.saturated = 0  # counts since the last reset_counts()
        self.underflowed = 0
        self.elements = 0

    def scale_for(self, x: torch.Tensor, group=None, record: bool = True) -> torch.Tensor:
        """The scale to quantize ``x`` with. Delayed: the current scale, and (``record``) the
        amax of ``x`` goes into the current history slot, for the next step's scale."""
        if self.scale.device != x.device:  # the model moved (to its GPU) after it was built
            self.scale, self.history = self.scale.to(x.device), self.history.to(x.device)
        if self.recipe.recipe == "tensorwise":
            return scale_from_amax(_amax(x, group), self.fp8_max, self.recipe.margin,
                                   self.scale)
        if record:  # this rank's amax; maxed over the ranks once per step, in fp8_step
            self.history[0] = torch.maximum(self.history[0], _amax(x, None))
        return self.scale

    def step(self, *groups) -> None:
        """Delayed scaling, once per optimizer step: the next scale from the history (its
        current slot first maxed over ``groups``: the tensor-parallel ranks, which hold other
        pieces of the tensor, and the data-parallel ranks, which saw other micro-batches),
        then a fresh slot (the oldest amax is dropped)."""
        if self.recipe.recipe != "delayed":
            return
        current = self.history[:1].clone()
        _max_over(current, groups)
        self.history[0] = current[0]
        amax = self.history.max() if self.recipe.amax_compute_algo == "max" \
            else self.history[0]
        self.scale = scale_from_amax(amax, self.fp8_max, self.recipe.margin, self.scale)
        self.history = torch.roll(self.history, 1)
        self.history[0] = 0.0

    def quantize(self, x: torch.Tensor, scale: torch.Tensor):
        """(x x scale saturated and cast to FP8, 1 / scale); with ``counting``, counts
        saturations and underflows."""
        scaled = x.detach().float() * scale
        fp8 = scaled.clamp(-self.fp8_max, self.fp8_max).to(self.dtype)
        if self.counting:
            self.saturated += int((scaled.abs() > self.fp8_max).sum())
            self.underflowed += int(((fp8.float() == 0) & (x != 0)).sum())
            self.elements += x.numel()
        return fp8, scale.reciprocal().float()


class FP8Meta:
    """The scaling states of one linear layer's three roles."""

    def __init__(self, recipe: FP8Recipe, device=None, amax_group=None):
        self.recipe, self.amax_group = recipe, amax_group
        self.states = {role: ScalingState(recipe, role, device) for role in ROLES}

    def step(self, group=None) -> None:
        fp8_step([self], group)

    def set_counting(self, on: bool) -> None:
        for state in self.states.values():
            state.counting = on

    def counts(self) -> dict:
        """{role: (saturated, underflowed, elements)} since the last ``reset_counts``."""
        return {role: (s.saturated, s.underflowed, s.elements)
                for role, s in self.states.items()}

    def reset_counts(self) -> None:
        for s in self.states.values():
            s.saturated = s.underflowed = s.elements = 0

    def quantize(self, role: str, x: torch.Tensor, record: bool = True):
        state = self.states[role]
        return state.quantize(x, state.scale_for(x, self.amax_group, record))


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major (what _scaled_mm wants for its second operand)."""
    return t.t().contiguous().t()


def fp8_matmul(a, scale_inv_a, b, scale_inv_b, out_dtype) -> torch.Tensor:
    """a [m, k] @ b [k, n] in FP8, dequantized by the two inverse scales."""
    return torch._scaled_mm(a.contiguous(), _column_major(b), scale_a=scale_inv_a,
                            scale_b=scale_inv_b, out_dtype=out_dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, meta: FP8Meta, record: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = meta.quantize("input", x2, record)
        wq, ws = meta.quantize("weight", weight, record)
        y = fp8_matmul(xq, xs, wq.t(), ws, out_dtype=x.dtype)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.meta, ctx.shape, ctx.dtypes = meta, shape, (x.dtype, weight.dtype)
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        xq, xs, wq, ws = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        gq, gs = ctx.meta.quantize("grad_output", g2)
        grad_x = fp8_matmul(gq, gs, wq, ws, out_dtype=ctx.dtypes[0])
        grad_w = fp8_matmul(gq.t(), gs, xq, xs, out_dtype=torch.float32)
        return grad_x.reshape(ctx.shape), grad_w.to(ctx.dtypes[1]), None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, meta: FP8Meta,
               bias: Optional[torch.Tensor] = None, record: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the GEMMs in FP8 (the bias added in x's dtype).
    ``record``: feed the delayed recipe's amax history (False in evaluation)."""
    y = _FP8Linear.apply(x, weight, meta, record)
    return y + bias if bias is not None else y


def _max_over(t: torch.Tensor, groups) -> None:
    for group in dict.fromkeys(g for g in groups if g is not None):  # each group once
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)


def fp8_step(metas, group=None) -> None:
    """Delayed scaling's update after an optimizer step, for many layers at once: the amaxes
    of this step, maxed over each layer's ``amax_group`` (the layers of one model share it)
    and ``group`` (data-parallel) with one all-reduce per group, give the next scales."""
    states = [s for m in metas for s in m.states.values() if s.recipe.recipe == "delayed"]
    if not states:
        return
    current = torch.stack([s.history[0] for s in states])
    _max_over(current, [m.amax_group for m in metas] + [group])
    for state, amax in zip(states, current):
        state.history[0] = amax
        state.step()


def fp8_metas(module: torch.nn.Module):
    """The FP8 scaling states of a model's linear layers."""
    return [m.fp8_meta for m in module.modules() if getattr(m, "fp8_meta", None) is not None]
