"""This pipeline stage's stack of transformer layers, and the final norm on the last stage."""

import functools
from typing import Optional, Sequence

import torch
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.extensions.transformer_engine import fp8_context
from megatron.core.transformer.compile import CompiledFunctions
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import build_layer
from megatron.core.transformer.norms import build_norm
from megatron.core.transformer.recompute import checkpoint_function


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
        self._compiled = CompiledFunctions(self.layers, "the transformer layers") \
            if config.torch_compile else None  # each layer; the block, pipeline stay eager
        self._checkpoint = checkpoint_function(config)

    def _recompute_plan(self):
        """[(start, stop, checkpointed)] over this stage's layers: full recomputation's
        ``uniform`` method checkpoints every group of recompute_num_layers layers as one
        (keeping only the group's input), ``block`` the first recompute_num_layers layers
        one by one; otherwise one group, not checkpointed."""
        n, c = len(self.layers), self.config
        if c.recompute_granularity != "full" or n == 0:
            return [(0, n, False)]
        k = c.recompute_num_layers
        if c.recompute_method == "uniform":
            return [(i, min(i + k, n), True) for i in range(0, n, k)]
        plan = [(i, i + 1, True) for i in range(min(k, n))]
        return plan + ([(k, n, False)] if k < n else [])

    def _run(self, start, stop, x, attention_mask, rotary_pos_emb, inference_context):
        for i in range(start, stop):
            layer = self.layers[i]
            with layer.recompute_context():
                if self._compiled is not None and inference_context is None:
                    x = self._compiled(i, x, attention_mask, rotary_pos_emb)
                else:
                    x = layer(x, attention_mask, rotary_pos_emb,
                              inference_context=inference_context)
        return x

    def forward(self, x: torch.Tensor, attention_mask=None, rotary_pos_emb=None,
                inference_context=None) -> torch.Tensor:
        recompute = self.training and torch.is_grad_enabled()
        with fp8_context(self.config):  # TransformerEngine's FP8 region (else nothing)
            for start, stop, checkpointed in self._recompute_plan():
                if checkpointed and recompute:  # keep only x; run again in backward
                    x = self._checkpoint(functools.partial(self._run, start, stop), x,
                                         attention_mask, rotary_pos_emb, None)
                else:
                    x = self._run(start, stop, x, attention_mask, rotary_pos_emb,
                                  inference_context)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return x
