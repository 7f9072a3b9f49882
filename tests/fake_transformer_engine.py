"""A stand-in for ``transformer_engine.pytorch`` that runs on CPU, for testing our wiring.

TransformerEngine needs CUDA, so these tests cannot run the real thing. The fake keeps TE's
public names, constructor keywords, parameter names and parallel semantics (column / row
splits on the given tensor-parallel group, sequence-parallel all-gather and reduce-scatter,
a LayerNormLinear's norm computed on the local sequence shard before the gather, causal
attention over local heads) and computes in full precision; FP8 recipes and ``autocast``
are recorded, not applied.

Every constructor, forward and function call is recorded in ``CALLS`` as
(TE's public name, keywords passed); tests/core/extensions/test_transformer_engine_api.py
checks each against the real TransformerEngine 2.20.2 source, so the fake cannot accept a
keyword TE does not.

    with installed() as te:       # sys.modules["transformer_engine..."] -> the fake
        model = GPTModel(TransformerConfig(..., transformer_impl="transformer_engine"), ...)
"""

import contextlib
import enum
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer.norms import rms_norm

CALLS = []


def _record(api: str, kwargs: dict) -> None:
    CALLS.append((api, tuple(sorted(kwargs))))


def _check_group(tp_group, tp_size) -> None:
    assert tp_group is ps.get_tensor_model_parallel_group(), "not our tensor-parallel group"
    assert tp_size == ps.get_tensor_model_parallel_world_size(), "tp_size disagrees with group"


class _Module(nn.Module):
    """TE modules carry FP8 metadata in ``_extra_state`` (an empty byte tensor without FP8)."""

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        assert isinstance(state, torch.Tensor) and state.dtype == torch.uint8


def _norm(x, weight, bias, normalization, eps, zero_centered):
    """The local layers' arithmetic (so that their results can be compared bit for bit)."""
    gain = weight + 1 if zero_centered else weight
    if normalization == "LayerNorm":
        return F.layer_norm(x, x.shape[-1:], gain, bias, eps)
    return rms_norm(x, gain, eps)


class Linear(_Module):
    def __init__(self, in_features, out_features, sequence_parallel=False, tp_group=None,
                 tp_size=1, get_rng_state_tracker=None, init_method=None, bias=True,
                 params_dtype=None, parallel_mode=None, device="cuda", **kwargs):
        super().__init__()
        _record(type(self).__name__, dict(
            in_features=in_features, out_features=out_features,
            sequence_parallel=sequence_parallel, tp_group=tp_group, tp_size=tp_size,
            get_rng_state_tracker=get_rng_state_tracker, init_method=init_method, bias=bias,
            params_dtype=params_dtype, parallel_mode=parallel_mode, device=device, **kwargs))
        _check_group(tp_group, tp_size)
        assert parallel_mode in ("column", "row")
        self.parallel_mode = parallel_mode
        self.sequence_parallel = sequence_parallel and tp_size > 1
        self.tp_size = tp_size
        out_local = out_features // tp_size if parallel_mode == "column" else out_features
        in_local = in_features // tp_size if parallel_mode == "row" else in_features
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=params_dtype,
                                               device=device))
        if init_method is not None:
            init_method(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_local, dtype=params_dtype, device=device)) \
            if bias else None

    def _column_input(self, x):
        if self.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(x)
        return mappings.copy_to_tensor_model_parallel_region(x)

    def forward(self, x, **kwargs):
        _record(type(self).__name__ + ".forward", kwargs)
        if self.parallel_mode == "column":
            return F.linear(self._column_input(x), self.weight, self.bias)
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        y = mappings.reduce_scatter_to_sequence_parallel_region(y) if self.sequence_parallel \
            else mappings.reduce_from_tensor_model_parallel_region(y)
        return y if self.bias is None else y + self.bias


class LayerNormLinear(Linear):
    def __init__(self, in_features, out_features, eps=1e-5, sequence_parallel=False,
                 normalization="LayerNorm", zero_centered_gamma=False, params_dtype=None,
                 device="cuda", **kwargs):
        super().__init__(in_features, out_features, sequence_parallel=sequence_parallel,
                         params_dtype=params_dtype, device=device, eps=eps,
                         normalization=normalization, zero_centered_gamma=zero_centered_gamma,
                         **kwargs)
        CALLS[-1] = ("LayerNormLinear", CALLS[-1][1])
        self.eps, self.normalization = eps, normalization
        self.zero_centered_gamma = zero_centered_gamma
        fill = torch.zeros if zero_centered_gamma else torch.ones
        self.layer_norm_weight = nn.Parameter(fill(in_features, dtype=params_dtype,
                                                   device=device))
        self.layer_norm_bias = nn.Parameter(torch.zeros(in_features, dtype=params_dtype,
                                                        device=device)) \
            if normalization == "LayerNorm" else None

    def forward(self, x, **kwargs):
        _record("LayerNormLinear.forward", kwargs)
        x = _norm(x, self.layer_norm_weight, self.layer_norm_bias, self.normalization, self.eps,
                  self.zero_centered_gamma)
        return F.linear(self._column_input(x), self.weight, self.bias)


class _Norm(_Module):
    normalization = "LayerNorm"

    def __init__(self, normalized_shape=None, eps=1e-5, sequence_parallel=None,
                 params_dtype=None, zero_centered_gamma=False, **kwargs):
        super().__init__()
        _record(type(self).__name__, dict(
            normalized_shape=normalized_shape, eps=eps, sequence_parallel=sequence_parallel,
            params_dtype=params_dtype, zero_centered_gamma=zero_centered_gamma, **kwargs))
        device = kwargs.get("device", "cuda")
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        fill = torch.zeros if zero_centered_gamma else torch.ones
        self.weight = nn.Parameter(fill(normalized_shape, dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(normalized_shape, dtype=params_dtype,
                                             device=device)) \
            if self.normalization == "LayerNorm" else None

    def forward(self, x):
        return _norm(x, self.weight, self.bias, self.normalization, self.eps,
                     self.zero_centered_gamma)


class LayerNorm(_Norm):
    pass


class RMSNorm(_Norm):
    normalization = "RMSNorm"


class DotProductAttention(_Module):
    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None,
                 attention_dropout=0.0, qkv_format="sbhd", attn_mask_type="causal",
                 sequence_parallel=False, tp_size=1, get_rng_state_tracker=None, tp_group=None,
                 layer_number=None, **kwargs):
        super().__init__()
        _record("DotProductAttention", dict(
            num_attention_heads=num_attention_heads, kv_channels=kv_channels,
            num_gqa_groups=num_gqa_groups, attention_dropout=attention_dropout,
            qkv_format=qkv_format, attn_mask_type=attn_mask_type,
            sequence_parallel=sequence_parallel, tp_size=tp_size,
            get_rng_state_tracker=get_rng_state_tracker, tp_group=tp_group,
            layer_number=layer_number, **kwargs))
        _check_group(tp_group, tp_size)
        assert qkv_format == "sbhd"
        self.heads = num_attention_heads // tp_size
        self.groups = (num_gqa_groups or num_attention_heads) // tp_size
        self.dropout = attention_dropout
        self.mask_type = attn_mask_type
        self.tracker = get_rng_state_tracker

    def forward(self, query_layer, key_layer, value_layer, attention_mask=None, **kwargs):
        _record("DotProductAttention.forward",
                dict(kwargs, **({} if attention_mask is None else
                                {"attention_mask": attention_mask})))
        mask_type = kwargs.get("attn_mask_type", self.mask_type)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        if self.heads != self.groups:
            k, v = (t.repeat_interleave(self.heads // self.groups, dim=1) for t in (k, v))
        mask = None if mask_type == "causal" else ~attention_mask
        dropout = self.dropout if self.training else 0.0
        ctx = self.tracker().fork() if dropout > 0 else contextlib.nullcontext()
        with ctx:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=mask is None)
        s, b = query_layer.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class autocast:  # noqa: N801 (TE's name)
    def __init__(self, enabled=True, calibrating=False, recipe=None, amax_reduction_group=None,
                 _graph=False):
        _record("autocast", dict(enabled=enabled, calibrating=calibrating, recipe=recipe,
                                 amax_reduction_group=amax_reduction_group))
        self.recipe, self.group = recipe, amax_reduction_group

    def __enter__(self):
        ENTERED.append((self.recipe, self.group))
        return self

    def __exit__(self, *exc):
        return False


ENTERED = []


@contextlib.contextmanager
def quantized_model_init(enabled=True, recipe=None, preserve_high_precision_init_val=False):
    _record("quantized_model_init", dict(enabled=enabled, recipe=recipe,
                                         preserve_high_precision_init_val=
                                         preserve_high_precision_init_val))
    yield


def checkpoint(function, *args, **kwargs):
    """TE's activation checkpointing: its own keywords are popped from ``kwargs``."""
    from megatron.core.tensor_parallel import checkpoint as ours
    _record("checkpoint", kwargs)
    assert kwargs.get("get_rng_state_tracker") is not None
    return ours(function, *args)


# --- transformer_engine.common.recipe ------------------------------------------------------

class Format(enum.Enum):
    E4M3 = "E4M3"
    HYBRID = "HYBRID"


@dataclass
class DelayedScaling:
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"

    def __post_init__(self):
        _record("DelayedScaling", {k: 1 for k in ("margin", "fp8_format", "amax_history_len",
                                                  "amax_compute_algo")})


@dataclass
class Float8CurrentScaling:
    fp8_format: Format = Format.HYBRID

    def __post_init__(self):
        _record("Float8CurrentScaling", {"fp8_format": 1})


@contextlib.contextmanager
def installed():
    """Make ``import transformer_engine.pytorch`` (and ``.common.recipe``) give the fake."""
    names = ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.common",
             "transformer_engine.common.recipe")
    saved = {name: sys.modules.get(name) for name in names}
    root, common = types.ModuleType(names[0]), types.ModuleType(names[2])
    pytorch, recipe = types.ModuleType(names[1]), types.ModuleType(names[3])
    for cls in (Linear, LayerNormLinear, LayerNorm, RMSNorm, DotProductAttention):
        cls.__module__ = "transformer_engine.pytorch.fake"
        setattr(pytorch, cls.__name__, cls)
    pytorch.autocast, pytorch.quantized_model_init = autocast, quantized_model_init
    pytorch.checkpoint = checkpoint
    recipe.Format, recipe.DelayedScaling = Format, DelayedScaling
    recipe.Float8CurrentScaling = Float8CurrentScaling
    root.pytorch, root.common, common.recipe = pytorch, common, recipe
    sys.modules.update(zip(names, (root, pytorch, common, recipe)))
    try:
        yield pytorch
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
