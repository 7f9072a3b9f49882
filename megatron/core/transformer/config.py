"""TransformerConfig: the shape, normalization placement and parallel layout of a GPT."""

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from megatron.core import ConfigError
from megatron.core.transformer.pipeline_layout import (
    check_pipeline_layout,
    pipeline_layer_numbers,
)

RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "output_norm")
"""Selective recomputation's parts: the attention core (softmax(QK^T)V), the whole MLP, the
input norms' outputs (recomputed from the layer's kept input instead of kept for the next
projection), Peri-LN's output norms' inputs (recomputed by the sublayer's output projection
from its kept input)."""


class NormPlacement(str, enum.Enum):
    """Where the normalization layers sit around each sublayer F (attention or MLP)."""

    PRE = "pre"    # x = x + F(N(x))
    POST = "post"  # x = N(x + F(x))
    PERI = "peri"  # x = x + N_out(F(N_in(x)))
    MIX = "mix"    # post for the first round(alpha * L) layers, pre for the rest


@dataclass
class TransformerConfig:
    num_layers: int
    """Number of transformer layers in the whole model (all pipeline stages)."""
    hidden_size: int
    """Width of the residual stream."""
    num_attention_heads: int
    """Number of query heads."""
    ffn_hidden_size: Optional[int] = None
    """MLP inner width; 4 x hidden_size, or Megatron's 2/3 rule rounded to 64 with SwiGLU."""
    kv_channels: Optional[int] = None
    """Width of one attention head; hidden_size / num_attention_heads by default."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; num_attention_heads when None."""

    norm_placement: NormPlacement = NormPlacement.PRE
    """pre, post, peri or mix (see NormPlacement)."""
    mix_ln_alpha: float = 0.25
    """Fraction of leading layers that are Post-LN under the mix placement."""
    embedding_norm: bool = False
    """Normalize the embedding output before the first layer."""
    normalization: str = "LayerNorm"
    """LayerNorm or RMSNorm."""
    norm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    qk_layernorm: bool = False
    """Normalize queries and keys per head, over kv_channels, before RoPE (one norm for the
    queries and one for the keys in each layer, shared by the heads)."""
    layernorm_zero_centered_gamma: bool = False
    """Store every norm's gain zero-centred, applied as (1 + weight) (--apply-layernorm-1p)."""

    gated_linear_unit: bool = False
    """SwiGLU MLP (gate and up projections in linear_fc1) instead of GELU."""
    add_bias_linear: bool = True
    """Biases on every linear layer."""
    position_embedding_type: str = "learned_absolute"
    """learned_absolute or rope."""
    rotary_base: int = 10000
    """RoPE base period."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels that RoPE rotates."""
    rope_from_position_ids: bool = False
    """RoPE rotates each token by its ``position_ids`` entry (packed fine-tuning sequences,
    whose conversations each start at 0) instead of by its index in the sequence (Megatron's
    pretraining, which ignores position ids for RoPE)."""
    max_position_embeddings: int = 2048
    """Rows of the learned position table; the longest sequence the model accepts."""
    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the token embedding."""

    hidden_dropout: float = 0.1
    """Dropout on each sublayer's output and on the embedding."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    init_method_std: float = 0.02
    """Std of the normal init; output projections use std / sqrt(2 * num_layers)."""
    init_seed: Optional[int] = None
    """When set, the embedding, each layer and the output layer draw their initial weights
    from their own generator seeded from this and their global position, so the model starts
    from the same weights whatever the pipeline layout. None: the default generator, in
    construction order."""

    params_dtype: torch.dtype = torch.float32
    """Dtype of the model's parameters (bf16/fp16 keep fp32 master copies in the optimizer)."""
    fp8: Optional[object] = None
    """An ``megatron.core.fp8.FP8Recipe``: the transformer layers' linear layers (not the output
    layer) multiply in FP8 through torch._scaled_mm; None: in params_dtype."""
    recompute_granularity: Optional[str] = None
    """None, "full" (keep only the inputs of the recomputed layers) or "selective"."""
    recompute_method: Optional[str] = None
    """Full recomputation: "uniform" (every group of recompute_num_layers layers keeps only
    its input) or "block" (the first recompute_num_layers layers of each stage)."""
    recompute_num_layers: Optional[int] = None
    """Full recomputation: the group size (uniform) or the number of layers (block)."""
    recompute_modules: Optional[List[str]] = None
    """Selective recomputation: parts from RECOMPUTE_MODULES (default ["core_attn"])."""
    torch_compile: bool = False
    """Compile each transformer layer with torch.compile (the pipeline machinery stays
    eager)."""
    fp8_param_gather: bool = False
    """Hold the transformer layers' weights in FP8 (TransformerEngine only)."""
    transformer_impl: str = "local"
    """local (this package's layers, any device) or transformer_engine (TE's layers, CUDA)."""
    tensor_model_parallel_size: int = 1
    """Ranks that split each layer."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the stack of layers."""
    sequence_parallel: bool = False
    """Split activations outside tensor-parallel regions along the sequence."""
    context_parallel_size: int = 1
    """Ranks that split every sequence (each holds 1/N of it; attention exchanges keys and
    values among them; see context_parallel.py)."""
    cp_comm_type: Union[str, List[str]] = "p2p"
    """How context-parallel attention gets the other ranks' keys and values: "p2p" (a ring,
    each transfer overlapped with attention to the block at hand) or "all_gather"; one value,
    or one per layer."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank (interleaved schedule)."""
    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Layers on the first pipeline stage when they are not split evenly."""
    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Layers on the last pipeline stage when they are not split evenly."""

    def __post_init__(self):
        self.norm_placement = _parse_enum(NormPlacement, self.norm_placement, "norm_placement")
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; the hidden size must be a "
                    "multiple of the number of heads (or set kv_channels).")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_query_groups < 1 or self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_query_groups={self.num_query_groups} does not divide "
                f"num_attention_heads={self.num_attention_heads}; each query group must hold "
                "the same number of heads.")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = (int(4 * self.hidden_size * 2 / 3 / 64) * 64
                                    if self.gated_linear_unit else 4 * self.hidden_size)
        for name in ("ffn_hidden_size", "kv_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ConfigError(f"normalization={self.normalization} is not supported; expected "
                              "LayerNorm or RMSNorm.")
        for name in ("qk_layernorm", "layernorm_zero_centered_gamma"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            raise ConfigError(f"position_embedding_type={self.position_embedding_type} is not "
                              "supported; expected learned_absolute or rope.")
        if not 0.0 <= self.mix_ln_alpha <= 1.0:
            raise ConfigError(f"mix_ln_alpha={self.mix_ln_alpha} must lie in [0, 1].")
        if self.position_embedding_type == "rope" and self.kv_channels % 2:
            raise ConfigError(f"kv_channels={self.kv_channels} must be even for rotary "
                              "position embeddings.")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in [0, 1).")
        if self.context_parallel_size < 1:
            raise ConfigError(f"context_parallel_size={self.context_parallel_size} must be at "
                              "least 1.")
        from megatron.core.transformer.context_parallel import normalize_comm_types
        self.cp_comm_type = normalize_comm_types(self.cp_comm_type, self.num_layers)
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise ConfigError(f"transformer_impl={self.transformer_impl} is not supported; "
                              "expected local or transformer_engine.")
        if self.torch_compile and self.transformer_impl == "transformer_engine":
            raise ConfigError("torch_compile compiles the local layers; TransformerEngine's "
                              "layers run their own fused kernels (use one or the other).")
        if self.fp8_param_gather and (self.fp8 is None
                                      or self.transformer_impl != "transformer_engine"):
            raise ConfigError("fp8_param_gather needs fp8 and transformer_impl="
                              "transformer_engine.")
        self._check_recompute()
        self._check_tensor_parallel_split()
        check_pipeline_layout(self.num_layers, self.pipeline_model_parallel_size,
                              self.virtual_pipeline_model_parallel_size,
                              self.num_layers_in_first_pipeline_stage,
                              self.num_layers_in_last_pipeline_stage)

    def _check_recompute(self):
        g = self.recompute_granularity
        if g not in (None, "full", "selective"):
            raise ConfigError(f"recompute_granularity={g} is not supported; expected full or "
                              "selective.")
        if g == "full":
            if self.recompute_method not in ("uniform", "block"):
                raise ConfigError(f"recompute_method={self.recompute_method} must be uniform "
                                  "or block with full recomputation.")
            if not isinstance(self.recompute_num_layers, int) or self.recompute_num_layers < 1:
                raise ConfigError(f"recompute_num_layers={self.recompute_num_layers} must be a "
                                  "positive integer with full recomputation.")
        if g == "selective":
            if self.recompute_modules is None:
                self.recompute_modules = ["core_attn"]
            unknown = [m for m in self.recompute_modules if m not in RECOMPUTE_MODULES]
            if unknown:
                raise ConfigError(f"recompute_modules {unknown} are not available; choose "
                                  f"from {', '.join(RECOMPUTE_MODULES)}.")
            local_only = [m for m in self.recompute_modules if m in ("layernorm", "output_norm")]
            if local_only and self.torch_compile:
                raise ConfigError(f"recompute_modules {local_only} cannot be combined with "
                                  "torch_compile: the compiler decides which of a layer's "
                                  "tensors to keep and recomputes norms itself; use core_attn, "
                                  "mlp or full recomputation.")
            if local_only and self.transformer_impl == "transformer_engine":
                raise ConfigError(f"recompute_modules {local_only} recompute the local "
                                  "layers' norms; with transformer_engine use core_attn or mlp.")

    def recomputes(self, module: str) -> bool:
        """Whether selective recomputation covers ``module`` (one of RECOMPUTE_MODULES)."""
        return self.recompute_granularity == "selective" and \
            module in (self.recompute_modules or ())

    def _check_tensor_parallel_split(self):
        tp = self.tensor_model_parallel_size
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(self, name) % tp:
                raise ConfigError(
                    f"{name}={getattr(self, name)} is not divisible by "
                    f"tensor_model_parallel_size={tp}; each tensor-parallel rank must hold an "
                    "equal share.")

    @property
    def num_post_ln_layers(self) -> int:
        """Leading Post-LN layers under mix: round(alpha * L), halves rounded up."""
        return int(math.floor(self.mix_ln_alpha * self.num_layers + 0.5))

    def layer_placement(self, layer_number: int) -> NormPlacement:
        """The placement of global layer ``layer_number`` (1-based, as Megatron numbers layers)."""
        if self.norm_placement is NormPlacement.MIX:
            return NormPlacement.POST if layer_number <= self.num_post_ln_layers \
                else NormPlacement.PRE
        return self.norm_placement

    @property
    def init_method(self):
        """normal(0, init_method_std), for every weight but the output projections."""
        return _init_normal(self.init_method_std)

    @property
    def output_layer_init_method(self):
        """Megatron's scaled init for the attention and MLP output projections."""
        return _init_normal(self.init_method_std / math.sqrt(2.0 * self.num_layers))

    def stage_layer_numbers(self, pp_rank: int, vp_rank: int = 0):
        """Global numbers of the layers that pipeline stage ``pp_rank`` (chunk ``vp_rank``)
        holds."""
        return pipeline_layer_numbers(self.num_layers, self.pipeline_model_parallel_size,
                                      pp_rank, self.virtual_pipeline_model_parallel_size,
                                      vp_rank, self.num_layers_in_first_pipeline_stage,
                                      self.num_layers_in_last_pipeline_stage)

    def init_rng(self, part: int):
        """Context in which part ``part`` (0 embedding, n layer n, num_layers + 1 output
        layer) draws its initial weights."""
        if self.init_seed is None:
            return contextlib.nullcontext()
        return _seeded_rng(self.init_seed * 1_000_003 + part)

    @property
    def has_final_norm(self) -> bool:
        """Post-LN layers already end in a norm; every other placement adds one at the end."""
        return self.norm_placement is not NormPlacement.POST


@contextlib.contextmanager
def _seeded_rng(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _init_normal(std: float):
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def _parse_enum(enum_type, value, name):
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum_type)
        raise ConfigError(f"{name}={value} is not a known choice; expected one of {choices}.") \
            from None
