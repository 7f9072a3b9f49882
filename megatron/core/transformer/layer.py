"""Transformer layers, one small class per normalization placement.

Each class lists the norms it owns and writes its residual steps in two lines that read like
the table in DESIGN.md. Adding a placement means adding a class here and an entry in
``LAYER_CLASSES`` (and the enum value in config.py).
"""

import contextlib
from typing import Dict, Type

import torch
from torch import nn

from megatron.core.tensor_parallel import get_rng_tracker
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.config import NormPlacement, TransformerConfig
from megatron.core.transformer.dropout import dropout
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.norms import build_norm
from megatron.core.transformer.recompute import RecomputedOutputs


class TransformerLayer(nn.Module):
    """Attention and MLP sublayers plus the norms named in ``norm_names``.

    ``layer_number`` is the 1-based position of the layer in the whole model (not in this
    pipeline stage), so per-layer behaviour and statistics do not depend on the layout.
    Each ``forward(x, mask, rope, inference_context)`` hands the last three to attention
    (``inference_context``: the key/value cache during generation, else None).
    """

    norm_names: tuple = ()
    input_norms: Dict[str, str] = {}
    """The norms in ``norm_names`` that only feed a sublayer ({norm: sublayer}): with
    TransformerEngine the sublayer's first projection computes them (a LayerNormLinear) and
    the layer holds an identity under the norm's name, so ``forward`` is the same."""
    sublayer_outputs: Dict[str, str] = {"attention": "self_attention", "mlp": "mlp"}
    """What the layer statistics (``--log-layer-stats``) record besides the layer's output:
    {site name: submodule whose output it is}, each a sublayer's output before it joins the
    residual stream."""

    def __init__(self, config: TransformerConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout
        self.sequence_parallel = config.sequence_parallel
        fused = set(self.input_norms) if config.transformer_impl == "transformer_engine" \
            else set()
        fused_into = {self.input_norms[name] for name in fused}
        self.self_attention = SelfAttention(config, layer_number,
                                            input_norm="self_attention" in fused_into)
        self.mlp = MLP(config, input_norm="mlp" in fused_into)
        for name in self.norm_names:
            self.add_module(name, nn.Identity() if name in fused else build_norm(config))
        self._recomputed = self._selective_recompute(config)

    def _selective_recompute(self, config: TransformerConfig):
        """``layernorm`` / ``output_norm`` selective recomputation (see recompute.py): the
        modules whose outputs are saved as recipes, or None."""
        marked = []
        if config.recomputes("layernorm"):
            marked += [getattr(self, name) for name in self.norm_names]
        if config.recomputes("output_norm"):  # Peri-LN: the projections its norms read
            marked += [sub for sub, norm in ((self.self_attention.linear_proj,
                                              "post_self_attn_layernorm"),
                                             (self.mlp.linear_fc2, "post_mlp_layernorm"))
                       if norm in self.norm_names]
        # an FP8 projection keeps its input quantized: recomputing from it would keep more
        marked = [m for m in marked if getattr(m, "fp8_meta", None) is None
                  and not isinstance(m, nn.Identity)]
        if not marked:
            return None
        outputs = RecomputedOutputs()
        for module in marked:
            module.register_forward_hook(outputs.mark_hook)
        return outputs

    def recompute_context(self):
        """The context this layer's forward runs in: selective recomputation of its norms'
        tensors, else nothing."""
        if self._recomputed is None or not self.training:
            return contextlib.nullcontext()
        return self._recomputed.saving()

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden dropout on a sublayer's output (per-rank masks on sequence-parallel shards)."""
        if not self.training or self.hidden_dropout == 0.0:
            return x
        if self.sequence_parallel:
            with get_rng_tracker().fork():
                return dropout(x, self.hidden_dropout, True)
        return dropout(x, self.hidden_dropout, True)


class PreNormLayer(TransformerLayer):
    """Pre-LN: x = x + F(N(x)).

        x ─┬─ input_layernorm ─ attention ─ dropout ─(+)─┬─ pre_mlp_layernorm ─ mlp ─ dropout ─(+)─>
           └─────────────────────────────────────────┘   └─────────────────────────────────────┘
    """

    norm_names = ("input_layernorm", "pre_mlp_layernorm")
    input_norms = {"input_layernorm": "self_attention", "pre_mlp_layernorm": "mlp"}

    def forward(self, x, mask=None, rope=None, inference_context=None):
        x = x + self.dropout(
            self.self_attention(self.input_layernorm(x), mask, rope, inference_context))
        x = x + self.dropout(self.mlp(self.pre_mlp_layernorm(x)))
        return x


class PostNormLayer(TransformerLayer):
    """Post-LN: x = N(x + F(x)).

        x ─┬─ attention ─ dropout ─(+)─ self_attn_residual_layernorm ─┬─ mlp ─ dropout ─(+)─ ...
           └──────────────────────┘                                    └────────────────┘
        ... ─ mlp_residual_layernorm ─>
    """

    norm_names = ("self_attn_residual_layernorm", "mlp_residual_layernorm")

    def forward(self, x, mask=None, rope=None, inference_context=None):
        x = self.self_attn_residual_layernorm(
            x + self.dropout(self.self_attention(x, mask, rope, inference_context)))
        x = self.mlp_residual_layernorm(x + self.dropout(self.mlp(x)))
        return x


class PeriNormLayer(TransformerLayer):
    """Peri-LN: x = x + N_out(F(N_in(x))) (Kim et al., 2025).

        x ─┬─ input_layernorm ─ attention ─ post_self_attn_layernorm ─ dropout ─(+)─┬─ ...
           └────────────────────────────────────────────────────────────────┘
        ... ─ pre_mlp_layernorm ─ mlp ─ post_mlp_layernorm ─ dropout ─(+)─>
    """

    norm_names = ("input_layernorm", "post_self_attn_layernorm",
                  "pre_mlp_layernorm", "post_mlp_layernorm")
    input_norms = {"input_layernorm": "self_attention", "pre_mlp_layernorm": "mlp"}
    sublayer_outputs = {"attention": "self_attention",
                        "attention_normed": "post_self_attn_layernorm",
                        "mlp": "mlp", "mlp_normed": "post_mlp_layernorm"}

    def forward(self, x, mask=None, rope=None, inference_context=None):
        x = x + self.dropout(self.post_self_attn_layernorm(
            self.self_attention(self.input_layernorm(x), mask, rope, inference_context)))
        x = x + self.dropout(self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(x))))
        return x


LAYER_CLASSES: Dict[NormPlacement, Type[TransformerLayer]] = {
    NormPlacement.PRE: PreNormLayer,
    NormPlacement.POST: PostNormLayer,
    NormPlacement.PERI: PeriNormLayer,
}


def build_layer(config: TransformerConfig, layer_number: int) -> TransformerLayer:
    """The layer for global ``layer_number``; Mix-LN picks post or pre by that number."""
    return LAYER_CLASSES[config.layer_placement(layer_number)](config, layer_number)
