"""This pipeline stage's stack of transformer layers, and the final norm on the last stage."""

from typing import Optional, Sequence

import torch
from torch import nn

from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import build_layer
from megatron.core.transformer.norms import build_norm


class TransformerBlock(nn.Module):
    """Layers ``layer_numbers`` (1-based, global) and, when ``post_process`` and the placement
    calls for one, ``final_layernorm``."""

    def __init__(self, config: TransformerConfig, layer_numbers: Optional[Sequence[int]] = None,
                 post_process: bool = True):
        super().__init__()
        if layer_numbers is None:
            layer_numbers = range(1, config.num_layers + 1)
        self.layers = nn.ModuleList(build_layer(config, n) for n in layer_numbers)
        self.final_layernorm = build_norm(config) if post_process and config.has_final_norm \
            else None

    def forward(self, x: torch.Tensor, attention_mask=None, rotary_pos_emb=None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, attention_mask, rotary_pos_emb)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return x
