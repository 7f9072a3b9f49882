"""This pipeline stage's stack of transformer layers, and the final norm on the last stage."""

from typing import Optional, Sequence

import torch
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.extensions.transformer_engine import fp8_context
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import build_layer
from megatron.core.transformer.norms import build_norm


class TransformerBlock(nn.Module):
    """Layers ``layer_numbers`` (1-based, global; by default those of this rank's pipeline
    stage) and, when ``post_process`` and the placement calls for one, ``final_layernorm``."""

    def __init__(self, config: TransformerConfig, layer_numbers: Optional[Sequence[int]] = None,
                 post_process: bool = True):
        super().__init__()
        self.config = config
        if layer_numbers is None:  # this rank's stage (and current virtual chunk)
            layer_numbers = config.stage_layer_numbers(
                ps.get_pipeline_model_parallel_rank(),
                ps.get_virtual_pipeline_model_parallel_rank() or 0)
        layers = []
        for n in layer_numbers:
            with config.init_rng(n):
                layers.append(build_layer(config, n))
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = build_norm(config) if post_process and config.has_final_norm \
            else None

    def forward(self, x: torch.Tensor, attention_mask=None, rotary_pos_emb=None,
                inference_context=None) -> torch.Tensor:
        with fp8_context(self.config):  # TransformerEngine's FP8 region (else nothing)
            for layer in self.layers:
                x = layer(x, attention_mask, rotary_pos_emb, inference_context=inference_context)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return x
