"""Transformer building blocks: config, norms, attention, MLP, layers, block."""

from megatron.core.transformer.block import TransformerBlock
from megatron.core.transformer.config import NormPlacement, TransformerConfig
from megatron.core.transformer.layer import (
    LAYER_CLASSES,
    PeriNormLayer,
    PostNormLayer,
    PreNormLayer,
    TransformerLayer,
    build_layer,
)
from megatron.core.transformer.norms import build_norm
