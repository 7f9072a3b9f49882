"""AdamW with Megatron's parameter groups, mixed precision and gradient clipping."""

from dataclasses import dataclass
from typing import List, Optional

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
    decoupled_lr: Optional[float] = None
    """Peak learning rate of the word embeddings and output layer (None: ``lr``)."""
    decoupled_min_lr: Optional[float] = None
    """Final learning rate of those, with ``decoupled_lr`` (None: the scheduler's min_lr)."""
    log_num_zeros_in_grad: bool = False
    """Count the zeros in the gradients at each step (``optimizer.num_zeros_in_grad``)."""

    def __post_init__(self):
        if self.bf16 and self.fp16:
            raise ConfigError("bf16=True and fp16=True were both set; choose one precision.")
        if self.lr is None or self.lr < 0:
            raise ConfigError(f"lr={self.lr} must be given as a non-negative number.")
        if self.clip_grad < 0:
            raise ConfigError(f"clip_grad={self.clip_grad} must be >= 0 (0 disables clipping).")


def get_param_groups(modules: List[nn.Module], decoupled_lr: Optional[float] = None,
                     decoupled_min_lr: Optional[float] = None) -> List[dict]:
    """Groups as Megatron-LM makes them: weight decay on matrices and embeddings
    (``wd_mult`` 1), none on norms and biases (1-D parameters, ``wd_mult`` 0). With
    ``decoupled_lr`` the word embeddings and output layer get groups of their own whose
    schedule peaks at ``max_lr`` = decoupled_lr (and ends at ``min_lr`` = decoupled_min_lr)."""
    decay, no_decay, decoupled = [], [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if decoupled_lr is not None and (name.endswith("word_embeddings.weight") or
                                             name.startswith("output_layer.")):
                decoupled.append(param)
            else:
                (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0},
              {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
    if decoupled:
        override = {"max_lr": decoupled_lr}
        if decoupled_min_lr is not None:
            override["min_lr"] = decoupled_min_lr
        groups.append({"params": decoupled, "wd_mult": 1.0, "lr_mult": 1.0, **override})
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
    optimizer = _build_optimizer(config, model_chunks)
    optimizer.log_num_zeros_in_grad = config.log_num_zeros_in_grad
    return optimizer


def _build_optimizer(config: OptimizerConfig, model_chunks: List[nn.Module]
                     ) -> MegatronOptimizer:
    modules = [getattr(chunk, "module", chunk) for chunk in model_chunks]
    groups = get_param_groups(modules, config.decoupled_lr, config.decoupled_min_lr)
    if config.use_distributed_optimizer:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        return DistributedOptimizer(lambda g: _adamw(g, config), model_chunks, groups,
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
