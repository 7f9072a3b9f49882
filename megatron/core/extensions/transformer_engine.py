"""TransformerEngine's layers on our process groups (``--transformer-impl transformer_engine``).

The model code stays the same; with TransformerEngine the pieces come from ``te``:

    linear_qkv, linear_fc1   te.LayerNormLinear where the placement has an input norm there
                             (pre, peri, mix's pre layers: the layer's input_layernorm /
                             pre_mlp_layernorm is then an identity), else te.Linear (column)
    linear_proj, linear_fc2  te.Linear (row)
    other norms              te.LayerNorm / te.RMSNorm (Peri-LN's output norms, Post-LN's
                             norms, the final and embedding norms, q/k norms)
    attention core           te.DotProductAttention (flash / fused kernels)

TE's tensor and sequence parallelism run on our tensor-parallel group. Weights are
initialized as the local implementation initializes them (the whole matrix from the same
generator, each rank keeping its slice), so both implementations start from the same model.
Checkpoints hold the local implementation's names (``checkpoint_name``): a model trained with
either loads into the other and converts to Hugging Face unchanged; TE's FP8 metadata
(``_extra_state``) is kept beside the weights and restored only at the same layout.

FP8 runs the transformer layers inside ``te.autocast`` with a DelayedScaling or
Float8CurrentScaling recipe built from ``--fp8-*``; amaxes are reduced over the tensor- and
data-parallel ranks of the pipeline stage.

``transformer_engine`` is imported on first use, never when this module is imported.
"""

import contextlib
import importlib
from typing import Optional

import torch
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import (
    _init_partition,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.random import get_rng_tracker

TRANSFORMER_ENGINE = "transformer_engine"
INSTALL_HINT = ("install it with `pip install --no-build-isolation transformer_engine[pytorch]` "
                "(or use an NVIDIA PyTorch container), or use --transformer-impl local")


def te_pytorch():
    """``transformer_engine.pytorch`` (imported now, on first use)."""
    return importlib.import_module("transformer_engine.pytorch")


def te_recipe_module():
    return importlib.import_module("transformer_engine.common.recipe")


def availability_problem(fp8: bool) -> Optional[str]:
    """Why TransformerEngine cannot run here (one sentence naming the fix), or None."""
    try:
        te_pytorch()
    except Exception as e:  # ImportError, or a CUDA library it cannot load
        reason = str(e).splitlines()[0] if str(e) else ""
        return (f"--transformer-impl transformer_engine needs TransformerEngine, which cannot "
                f"be imported here ({type(e).__name__}: {reason}); {INSTALL_HINT}.")
    if not torch.cuda.is_available():
        return ("--transformer-impl transformer_engine needs a CUDA GPU and none is visible; "
                "use --transformer-impl local to train on CPUs.")
    if fp8:
        return fp8_device_problem()
    return None


def fp8_device_problem() -> Optional[str]:
    """Why FP8 GEMMs cannot run on this GPU, or None (no GPU: the CPU path runs FP8)."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name()
        return (f"--fp8-format needs an NVIDIA GPU with FP8 tensor cores (compute capability "
                f"8.9 or newer: Ada, Hopper, Blackwell), but this {name} has {major}.{minor}; "
                "drop --fp8-format and train with --bf16.")
    return None


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _skip_init(weight: torch.Tensor) -> None:
    """TE's own initialization is replaced by ``_init_partition`` (same numbers as local)."""


def _tp_kwargs(config) -> dict:
    return dict(sequence_parallel=config.sequence_parallel,
                tp_group=ps.get_tensor_model_parallel_group(),
                tp_size=config.tensor_model_parallel_size,
                get_rng_state_tracker=get_rng_tracker)


def _mark_sequence_parallel(params, config) -> None:
    for param in params:
        if param is not None:
            param.sequence_parallel = config.sequence_parallel


def _initialize(weight: torch.Tensor, full_shape, dim: int, init_method, stride: int) -> None:
    with torch.no_grad():
        weight.copy_(_init_partition(full_shape, dim, init_method, stride, torch.float32))


def column_parallel_linear(config, input_size: int, output_size: int, *, init_method,
                           bias: bool, stride: int = 1, input_norm: bool = False) -> nn.Module:
    """te.Linear split by output rows, or te.LayerNormLinear when ``input_norm``: the layer's
    input norm (the placement's N_in) is then computed inside the projection."""
    te = te_pytorch()
    common = dict(init_method=_skip_init, bias=bias, params_dtype=config.params_dtype,
                  parallel_mode="column", device=_device(), **_tp_kwargs(config))
    if input_norm:
        module = te.LayerNormLinear(input_size, output_size, eps=config.norm_epsilon,
                                    normalization=config.normalization,
                                    zero_centered_gamma=config.layernorm_zero_centered_gamma,
                                    **common)
        _mark_sequence_parallel([module.layer_norm_weight,
                                 getattr(module, "layer_norm_bias", None)], config)
    else:
        module = te.Linear(input_size, output_size, **common)
    _initialize(module.weight, (output_size, input_size), 0, init_method, stride)
    set_tensor_model_parallel_attributes(module.weight, True, 0, stride)
    if bias:
        with torch.no_grad():
            module.bias.zero_()
        set_tensor_model_parallel_attributes(module.bias, True, 0, stride)
    return module


def row_parallel_linear(config, input_size: int, output_size: int, *, init_method,
                        bias: bool) -> nn.Module:
    """te.Linear split by input columns; the partial products are all-reduced (reduce-scattered
    along the sequence under sequence parallelism) and the whole bias added after."""
    te = te_pytorch()
    module = te.Linear(input_size, output_size, init_method=_skip_init, bias=bias,
                       params_dtype=config.params_dtype, parallel_mode="row", device=_device(),
                       **_tp_kwargs(config))
    _initialize(module.weight, (output_size, input_size), 1, init_method, 1)
    set_tensor_model_parallel_attributes(module.weight, True, 1)
    if bias:
        with torch.no_grad():
            module.bias.zero_()
        set_tensor_model_parallel_attributes(module.bias, False, 0)
        _mark_sequence_parallel([module.bias], config)
    return module


def norm(config, hidden_size: int) -> nn.Module:
    """te.LayerNorm or te.RMSNorm (zero-centred gain under --apply-layernorm-1p)."""
    te = te_pytorch()
    cls = te.LayerNorm if config.normalization == "LayerNorm" else te.RMSNorm
    module = cls(hidden_size, eps=config.norm_epsilon, sequence_parallel=config.sequence_parallel,
                 zero_centered_gamma=config.layernorm_zero_centered_gamma,
                 params_dtype=config.params_dtype, device=_device())
    _mark_sequence_parallel(module.parameters(), config)
    return module


def dot_product_attention(config, layer_number: int) -> nn.Module:
    """te.DotProductAttention over [s, b, heads, d] queries and [s, b, groups, d] keys/values,
    causal, heads split across the tensor-parallel group."""
    te = te_pytorch()
    return te.DotProductAttention(config.num_attention_heads, config.kv_channels,
                                  num_gqa_groups=config.num_query_groups,
                                  attention_dropout=config.attention_dropout,
                                  qkv_format="sbhd", attn_mask_type="causal",
                                  layer_number=layer_number, **_tp_kwargs(config))


def attend(core: nn.Module, q, k, v, attention_mask, recompute: bool = False) -> torch.Tensor:
    """Run ``dot_product_attention``'s module: [s, b, heads * d]. A given mask (Megatron's, True
    where attention is not allowed) is passed as TE's "arbitrary" mask; ``recompute``: TE
    recomputes the attention core in backward (selective recomputation's core_attn)."""
    kwargs = {"checkpoint_core_attention": True} if recompute else {}
    if attention_mask is None:
        return core(q, k, v, **kwargs)
    return core(q, k, v, attention_mask=attention_mask, attn_mask_type="arbitrary", **kwargs)


def checkpoint(function, *args):
    """TE's activation checkpointing (it keeps TE's FP8 metadata consistent between the two
    forward passes), with our RNG tracker's states restored for the second."""
    return te_pytorch().checkpoint(function, *args, distribute_saved_activations=False,
                                   get_rng_state_tracker=get_rng_tracker,
                                   tp_group=ps.get_tensor_model_parallel_group(),
                                   use_reentrant=False)


# --- FP8 -------------------------------------------------------------------------------------

def fp8_recipe(recipe):
    """TE's recipe for our ``FP8Recipe`` (``--fp8-*``)."""
    r = te_recipe_module()
    fmt = r.Format.HYBRID if recipe.format == "hybrid" else r.Format.E4M3
    if recipe.recipe == "tensorwise":
        return r.Float8CurrentScaling(fp8_format=fmt)
    return r.DelayedScaling(fp8_format=fmt, margin=recipe.margin,
                            amax_history_len=recipe.amax_history_len,
                            amax_compute_algo=recipe.amax_compute_algo)


def fp8_context(config):
    """The context the transformer layers run in: te.autocast with the model's recipe under
    FP8, else nothing."""
    if config.fp8 is None or config.transformer_impl != TRANSFORMER_ENGINE:
        return contextlib.nullcontext()
    if getattr(config, "_te_fp8_recipe", None) is None:
        config._te_fp8_recipe = fp8_recipe(config.fp8)
    return te_pytorch().autocast(enabled=True, recipe=config._te_fp8_recipe,
                                 amax_reduction_group=ps.get_tensor_and_data_parallel_group())


def fp8_model_init(config):
    """The context a model is built in: parameters held in FP8 (``--fp8-param-gather``), so
    the data-parallel gathers and the forward GEMMs read them without a cast."""
    if config.fp8 is None or not config.fp8_param_gather:
        return contextlib.nullcontext()
    return te_pytorch().quantized_model_init(enabled=True, recipe=fp8_recipe(config.fp8),
                                             preserve_high_precision_init_val=False)


# --- checkpoint names ------------------------------------------------------------------------

EXTRA_STATE = "_extra_state"


def is_extra_state(name: str) -> bool:
    """TE's per-module FP8 metadata entries of a state dict (no weights)."""
    return name == EXTRA_STATE or name.endswith("." + EXTRA_STATE)


# a LayerNormLinear's norm -> the layer's norm of the local implementation
FUSED_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def checkpoint_name(name: str) -> str:
    """The local implementation's name of a model parameter or state-dict entry (the names
    checkpoints hold): ``decoder.layers.3.mlp.linear_fc1.layer_norm_weight`` ->
    ``decoder.layers.3.pre_mlp_layernorm.weight``; other names are the same in both."""
    parts = name.split(".", 3)  # decoder, layers, index, the rest
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"] and parts[3] in FUSED_NORM_NAMES:
        return ".".join(parts[:3] + [FUSED_NORM_NAMES[parts[3]]])
    return name
