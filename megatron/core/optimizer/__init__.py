"""AdamW with Megatron's parameter groups, mixed precision and gradient clipping."""

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from megatron.core import ConfigError
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.core.optimizer.optimizer import (
    FP32Optimizer,
    MegatronOptimizer,
    MixedPrecisionOptimizer,
    make_master_param,
)


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    """Peak learning rate (the scheduler sets the current one)."""
    weight_decay: float = 0.01
    """Decoupled weight decay, applied to matrices and embeddings but not norms or biases."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    bf16: bool = False
    """Model parameters in bf16, fp32 master weights in the optimizer."""
    fp16: bool = False
    """Model parameters in fp16, fp32 master weights, loss scaling."""
    loss_scale: float = None
    """A constant fp16 loss scale; dynamic scaling when None."""
    initial_loss_scale: float = 2.0 ** 32
    """First dynamic loss scale."""
    min_loss_scale: float = 1.0
    """Floor of the dynamic loss scale."""
    loss_scale_window: int = 1000
    """Clean steps before the dynamic loss scale doubles."""
    hysteresis: int = 2
    """Overflowing steps tolerated before the dynamic loss scale halves."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state and fp32 master weights over data-parallel ranks (ZeRO-1)."""

    def __post_init__(self):
        if self.bf16 and self.fp16:
            raise ConfigError("bf16=True and fp16=True were both set; choose one precision.")
        if self.lr is None or self.lr < 0:
            raise ConfigError(f"lr={self.lr} must be given as a non-negative number.")
        if self.clip_grad < 0:
            raise ConfigError(f"clip_grad={self.clip_grad} must be >= 0 (0 disables clipping).")


def get_param_groups(modules: List[nn.Module]) -> List[dict]:
    """Two groups as Megatron-LM makes them: weight decay on matrices and embeddings
    (``wd_mult`` 1), none on norms and biases (1-D parameters, ``wd_mult`` 0)."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0},
              {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
    return [g for g in groups if g["params"]]


def _adamw(groups: List[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    for group in groups:
        group["weight_decay"] = config.weight_decay * group["wd_mult"]
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay,
                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device / torch build
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def _grad_scaler(config: OptimizerConfig):
    if not config.fp16:
        return None
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    return DynamicGradScaler(config.initial_loss_scale, config.min_loss_scale,
                             growth_interval=config.loss_scale_window,
                             hysteresis=config.hysteresis)


def get_megatron_optimizer(config: OptimizerConfig, model_chunks: List[nn.Module]
                           ) -> MegatronOptimizer:
    """AdamW over this rank's model chunks (DistributedDataParallel-wrapped, or plain
    modules), wrapped for the chosen precision; sharded with the distributed optimizer."""
    modules = [getattr(chunk, "module", chunk) for chunk in model_chunks]
    groups = get_param_groups(modules)
    if config.use_distributed_optimizer:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        wd_mult = {p: g["wd_mult"] for g in groups for p in g["params"]}
        return DistributedOptimizer(lambda g: _adamw(g, config), model_chunks, wd_mult,
                                    config.clip_grad, _grad_scaler(config))
    if not (config.bf16 or config.fp16):
        return FP32Optimizer(_adamw(groups, config), config.clip_grad)
    model_params = []
    for group in groups:
        model_params.extend(group["params"])
        group["params"] = [make_master_param(p) for p in group["params"]]
    return MixedPrecisionOptimizer(_adamw(groups, config), model_params, config.clip_grad,
                                   _grad_scaler(config))


__all__ = ["OptimizerConfig", "MegatronOptimizer", "get_megatron_optimizer", "get_param_groups"]
