"""Optimizer wrappers: gradients from ``main_grad``, grad norm and clipping, mixed precision.

``step()`` returns ``(update_successful, grad_norm)``; an fp16 overflow or a non-finite grad
norm skips the update (the caller counts it as a skipped iteration), and so does a
``before_update`` callback that returns True (the training loop's NaN and loss-spike guards).
A skipped update leaves parameters, optimizer state and loss scaler as they were.
"""

import math
from typing import Callable, List, Optional, Tuple

import torch

from megatron.core import parallel_state as ps
from megatron.core.optimizer.clip_grads import (
    clip_grads_by_total_norm,
    count_zeros_fp32,
    get_grad_norm_fp32,
)
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, found_non_finite
from megatron.core.tensor_parallel import param_is_tensor_parallel_duplicate
from megatron.core.timers import get_timers


def counts_in_grad_norm(param) -> bool:
    """Count each parameter once over the model-parallel group: not the copies that tensor
    ranks > 0 hold of replicated parameters, nor the last stage's copy of a tied embedding."""
    return not param_is_tensor_parallel_duplicate(param) and \
        not getattr(param, "shared_embedding", False)


class MegatronOptimizer:
    """Base: owns a ``torch.optim`` optimizer whose parameters carry fp32 gradients."""

    log_num_zeros_in_grad = False
    """Count the gradients' zeros at each step into ``num_zeros_in_grad`` (None otherwise)."""
    num_zeros_in_grad: Optional[int] = None

    def __init__(self, optimizer: torch.optim.Optimizer, clip_grad: float,
                 grad_scaler: Optional[ConstantGradScaler] = None):
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.grad_scaler = grad_scaler

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def get_loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (multiplied by the fp16 loss scale)."""
        return loss * self.get_loss_scale() if self.grad_scaler is not None else loss

    def _main_params(self) -> List[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _prepare_grads(self) -> bool:
        """Point the optimizer's parameters at their fp32 gradients; return found_inf."""
        raise NotImplementedError

    def _after_step(self) -> None:
        pass

    def _model_params(self) -> List[torch.Tensor]:
        """The model parameters (one per main parameter, same order)."""
        return self._main_params()

    def get_grad_norm(self) -> float:
        """Global grad norm over the model-parallel group, each parameter counted once."""
        grads = [main.grad for _, main in self._counted_once() if main.grad is not None]
        return get_grad_norm_fp32(grads, ps.get_model_parallel_group())

    def clip_grads(self, grad_norm: float) -> None:
        """Scale all gradients so their global norm (``grad_norm``) is at most ``clip_grad``
        (when it is > 0)."""
        if self.clip_grad > 0.0 and math.isfinite(grad_norm):
            grads = [p.grad for p in self._main_params() if p.grad is not None]
            clip_grads_by_total_norm(grads, self.clip_grad, grad_norm)

    @torch.no_grad()
    def step(self, before_update: Optional[Callable[[float], bool]] = None
             ) -> Tuple[bool, Optional[float]]:
        """Unscale, measure, clip and apply the gradients. ``before_update(grad_norm)`` runs
        after the grad norm is known, before clipping, with the unscaled gradients in place
        (``grad_square_sums`` reads them); returning True skips the update."""
        timers = get_timers()
        self.num_zeros_in_grad = None
        try:
            timers("optimizer-copy-to-main-grad", log_level=1).start()
            found_inf = self._prepare_grads()
            timers("optimizer-copy-to-main-grad").stop()
            if found_inf:  # fp16 overflow: a smaller loss scale next time
                self.grad_scaler.update(True)
                return False, None
            timers("optimizer-clip-main-grad", log_level=1).start()
            grad_norm = self.get_grad_norm()
            timers("optimizer-clip-main-grad").stop()
            if self.log_num_zeros_in_grad:
                timers("optimizer-count-zeros", log_level=1).start()
                self.num_zeros_in_grad = self.count_zeros()
                timers("optimizer-count-zeros").stop()
            if before_update is not None and before_update(grad_norm):
                return False, grad_norm
            if self.grad_scaler is not None:
                self.grad_scaler.update(False)
            if not math.isfinite(grad_norm):
                return False, grad_norm
            timers("optimizer-clip-main-grad", log_level=1).start()
            self.clip_grads(grad_norm)
            timers("optimizer-clip-main-grad").stop()
            timers("optimizer-inner-step", log_level=1).start()
            self.optimizer.step()
            timers("optimizer-inner-step").stop()
            timers("optimizer-copy-main-to-model-params", log_level=1).start()
            self._after_step()
            timers("optimizer-copy-main-to-model-params").stop()
            return True, grad_norm
        finally:
            # .grad aliases main_grad during the step only: left in place, the next backward
            # would accumulate into it and the main_grad hook would count it twice.
            for p in self._main_params():
                p.grad = None

    def _stats_group(self):
        """The group over which this optimizer holds each parameter once: model-parallel
        (tensor x pipeline); the distributed optimizer's slices span the whole world."""
        return ps.get_model_parallel_group()

    def _counted_once(self):
        """(model parameter, main parameter) pairs, leaving out the copies that another rank
        of ``_stats_group()`` also counts (tensor-parallel duplicates, a tied embedding's
        second copy)."""
        return [(model, main) for model, main in zip(self._model_params(), self._main_params())
                if counts_in_grad_norm(model)]

    def _counts_world_once(self) -> bool:
        """Whether this rank's ``_counted_once`` parameters, summed over the whole world, count
        each parameter once: data-parallel rank 0's do (the other replicas, data- and
        context-parallel, hold copies)."""
        return ps.get_data_parallel_rank(with_context_parallel=True) == 0

    def grad_square_sums(self, index_of: Callable[[torch.Tensor], int], size: int
                         ) -> torch.Tensor:
        """This rank's share of each group's squared gradient norm: a float64 [size] tensor
        whose sum over all ranks is, at ``index_of(model parameter)``, the sum of squares of
        that group's (unscaled, unclipped) gradients. Call inside ``step``'s
        ``before_update``."""
        pairs = [(model, main) for model, main in self._counted_once() if main.grad is not None]
        device = pairs[0][1].device if pairs else torch.device("cpu")
        out = torch.zeros(size, dtype=torch.float64, device=device)
        if not self._counts_world_once() or not pairs:
            return out
        norms = torch._foreach_norm([main.grad.float() for _, main in pairs])
        index = torch.tensor([index_of(model) for model, _ in pairs], device=device)
        out.index_add_(0, index, torch.stack(norms).double().square())
        return out

    def count_zeros(self) -> int:
        """Zeros in the main gradients, each parameter once (collective over
        ``_stats_group()``); call during ``step`` while the gradients are in place."""
        grads = [main.grad for _, main in self._counted_once() if main.grad is not None]
        return count_zeros_fp32(grads, self._stats_group())

    @torch.no_grad()
    def params_norm(self) -> float:
        """L2 norm of all parameters (the fp32 master values where kept), each counted once
        (collective over ``_stats_group()``); Megatron-LM's ``calc_params_l2_norm``."""
        return get_grad_norm_fp32([main for _, main in self._counted_once()],
                                  self._stats_group())

    def reload_model_params(self) -> None:
        """Refresh master weights from the model's (after loading weights without optimizer
        state); a no-op when the optimizer updates the model's parameters directly."""

    # --- checkpoints: per-parameter state, independent of the parallel layout ------------
    # ``param_state()`` maps each model parameter to its Adam moments (and its fp32 master
    # copy when the model is bf16/fp16), shaped like the parameter; ``load_param_state`` takes
    # the same from a function of the parameter. A checkpoint stores them by parameter name,
    # so any layout can read them back.

    def _main_of(self) -> dict:
        return dict(zip(self._model_params(), self._main_params()))

    def param_state(self) -> dict:
        """{model parameter: {"exp_avg", "exp_avg_sq"[, "fp32_param"]}} (views: copy before
        the next step)."""
        out = {}
        for model_param, main in self._main_of().items():
            state = self.optimizer.state.get(main, {})
            entry = {key: state.get(key, torch.zeros_like(main))
                     for key in ("exp_avg", "exp_avg_sq")}
            if main is not model_param:
                entry["fp32_param"] = main.detach()
            out[model_param] = entry
        return out

    def common_state(self) -> dict:
        """What every parameter shares: Adam's step count, the fp16 loss scaler."""
        steps = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        state = {"step": int(steps[0]) if steps else 0}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    @torch.no_grad()
    def load_param_state(self, saved_for, common: dict) -> None:
        """Restore from ``saved_for(model parameter)`` (the dict ``param_state`` gives, whole
        for this rank's parameter) and ``common``."""
        for model_param, main in self._main_of().items():
            self._restore(main, saved_for(model_param), model_param, common["step"])
        if self.grad_scaler is not None and "grad_scaler" in common:
            self.grad_scaler.load_state_dict(common["grad_scaler"])

    def _restore(self, main, saved: dict, model_param, step: int) -> None:
        """Set ``main``'s master value (when it is a copy) and Adam state from ``saved``
        (tensors already cut to ``main``'s elements)."""
        if main is not model_param and main.data_ptr() != model_param.data_ptr():
            source = saved.get("fp32_param")
            main.copy_(source.reshape(main.shape) if source is not None
                       else model_param.detach().reshape(main.shape))
        if step == 0:
            self.optimizer.state.pop(main, None)
            return
        # where torch's own load_state_dict puts the step: on the device for fused kernels
        on_device = any(g.get("fused") or g.get("capturable") for g in self.param_groups)
        self.optimizer.state[main] = {
            "step": torch.tensor(float(step), dtype=torch.float32,
                                 device=main.device if on_device else "cpu"),
            **{key: saved[key].reshape(main.shape).to(main.device, torch.float32, copy=True)
               for key in ("exp_avg", "exp_avg_sq")}}


class FP32Optimizer(MegatronOptimizer):
    """fp32 parameters: the optimizer reads ``main_grad`` directly (no copy)."""

    def _prepare_grads(self) -> bool:
        for p in self._main_params():
            p.grad = p.main_grad
        return False


def make_master_param(param: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of a bf16/fp16 parameter that keeps its tensor-parallel attributes."""
    master = param.detach().clone().float()
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride",
                 "sequence_parallel", "tensor_parallel_partial_grad"):
        if hasattr(param, attr):
            setattr(master, attr, getattr(param, attr))
    return master


class MixedPrecisionOptimizer(MegatronOptimizer):
    """bf16/fp16 parameters with fp32 master copies that the optimizer updates.

    The master copies' gradients are the fp32 ``main_grad`` buffers (no copy); fp16 gradients
    are unscaled and checked for overflow across the model-parallel group first. After the
    step the master values are copied back into the model's parameters.
    """

    def __init__(self, optimizer, model_params: List[torch.Tensor], clip_grad: float,
                 grad_scaler: Optional[ConstantGradScaler] = None):
        super().__init__(optimizer, clip_grad, grad_scaler)
        self.model_params = model_params

    def _model_params(self) -> List[torch.Tensor]:
        return self.model_params

    def _prepare_grads(self) -> bool:
        mains = self._main_params()
        for model_param, main_param in zip(self.model_params, mains):
            main_param.grad = model_param.main_grad.float()
        if self.grad_scaler is None:
            return False
        grads = [p.grad for p in mains]
        torch._foreach_mul_(grads, self.grad_scaler.inv_scale)
        found = torch.tensor([float(found_non_finite(grads))], device=grads[0].device)
        group = ps.get_model_parallel_group()
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(found.item())

    def _after_step(self) -> None:
        torch._foreach_copy_(self.model_params, self._main_params())

    @torch.no_grad()
    def reload_model_params(self) -> None:
        torch._foreach_copy_(self._main_params(), self.model_params)
