"""Causal self-attention with grouped-query heads, split by query group across TP ranks."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.inference.kv_cache import InferenceContext
from megatron.core.parallel_state import get_tensor_model_parallel_rank
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, get_rng_tracker
from megatron.core.transformer import context_parallel
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.norms import build_qk_norm
from megatron.core.transformer.recompute import checkpoint_function
from megatron.core.transformer.rope import apply_rotary_pos_emb

_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


class SelfAttention(nn.Module):
    """linear_qkv (column-parallel) -> [q_layernorm, k_layernorm] -> [RoPE] ->
    scaled_dot_product_attention (TransformerEngine's DotProductAttention under
    ``transformer_impl="transformer_engine"``, except with a key/value cache; with context
    parallelism, context_parallel.attention over the whole sequence) ->
    linear_proj (row-parallel).

    linear_qkv's output is laid out per query group as Megatron lays it out:
    [q_1 .. q_(heads/groups), k, v] for group 1, then group 2, ... so that a tensor-parallel
    rank owning a contiguous slice of rows owns whole query groups.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, input_norm: bool = False):
        """``input_norm``: TransformerEngine only -- linear_qkv is a LayerNormLinear that
        computes the layer's input norm first (the layer then holds an identity for it)."""
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.heads_per_rank = config.num_attention_heads // tp
        self.groups_per_rank = config.num_query_groups // tp
        self.attention_dropout = config.attention_dropout
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * config.kv_channels
        proj_size = config.num_attention_heads * config.kv_channels
        self.core_attention = None
        if config.transformer_impl == "transformer_engine":
            from megatron.core.extensions import transformer_engine as te_ext
            self.linear_qkv = te_ext.column_parallel_linear(
                config, config.hidden_size, qkv_size, init_method=config.init_method,
                bias=config.add_bias_linear, input_norm=input_norm)
            self.core_attention = te_ext.dot_product_attention(config, layer_number)
            self.linear_proj = te_ext.row_parallel_linear(
                config, proj_size, config.hidden_size,
                init_method=config.output_layer_init_method, bias=config.add_bias_linear)
        else:
            common = dict(bias=config.add_bias_linear,
                          sequence_parallel=config.sequence_parallel,
                          params_dtype=config.params_dtype, fp8=config.fp8)
            self.linear_qkv = ColumnParallelLinear(config.hidden_size, qkv_size,
                                                   init_method=config.init_method, **common)
            self.linear_proj = RowParallelLinear(proj_size, config.hidden_size,
                                                 init_method=config.output_layer_init_method,
                                                 **common)
        # per-head norms of queries and keys over head_dim (megatron-core's qk_layernorm)
        self.recompute_core = config.recomputes("core_attn")  # TE: its own core checkpoint
        self._checkpoint = checkpoint_function(config)
        self.q_layernorm = build_qk_norm(config) if config.qk_layernorm else None
        self.k_layernorm = build_qk_norm(config) if config.qk_layernorm else None
        self.cp_comm_type = config.cp_comm_type[layer_number - 1] \
            if config.context_parallel_size > 1 else None

    def _core(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v over [b, heads, s, d] (grouped-query heads)."""
        q_per_group = self.heads_per_rank // self.groups_per_rank
        if q_per_group > 1 and not _SDPA_HAS_GQA:
            k, v = (t.repeat_interleave(q_per_group, dim=1) for t in (k, v))
        gqa = {"enable_gqa": True} if q_per_group > 1 and _SDPA_HAS_GQA else {}
        dropout = self.attention_dropout if self.training else 0.0
        if dropout > 0.0:
            with get_rng_tracker().fork():  # heads differ per tensor-parallel rank
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                      dropout_p=dropout, is_causal=is_causal,
                                                      **gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              **gqa)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                inference_context: Optional[InferenceContext] = None) -> torch.Tensor:
        """x [s, b, h] -> [s, b, h]. attention_mask: None for causal, else Megatron's boolean
        [b, 1, s, s] mask with True where attention is *not* allowed (with context
        parallelism: None, or the document ids [b, whole s] of context_parallel.py).

        With ``inference_context`` the s tokens follow the context's ``sequence_len_offset``
        cached ones: their keys and values are appended to this layer's cache, and token i
        attends to cached positions 0 .. offset + i (a given mask must then be
        [b, 1, s, offset + s]).
        """
        qkv = self.linear_qkv(x)
        s, b = qkv.shape[:2]
        q_per_group = self.heads_per_rank // self.groups_per_rank
        qkv = qkv.view(s, b, self.groups_per_rank, (q_per_group + 2) * self.head_dim)
        q, k, v = qkv.split([q_per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(s, b, self.heads_per_rank, self.head_dim)
        if self.q_layernorm is not None:  # before RoPE, as megatron-core does
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary_pos_emb is not None:
            q = apply_rotary_pos_emb(q, rotary_pos_emb)
            k = apply_rotary_pos_emb(k, rotary_pos_emb)
        if self.cp_comm_type is not None:  # keeps q, k, v, its output and log-sum-exp only:
            # nothing for selective recomputation to save
            q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
            out = context_parallel.attention(
                q, k, v, attention_mask, self.cp_comm_type,
                self.attention_dropout if self.training else 0.0,
                head_offset=get_tensor_model_parallel_rank() * self.heads_per_rank)
            return self.linear_proj(out.permute(2, 0, 1, 3).reshape(s, b, -1))
        recompute = self.recompute_core and self.training and torch.is_grad_enabled() and \
            inference_context is None
        if self.core_attention is not None and inference_context is None:
            from megatron.core.extensions.transformer_engine import attend
            q, k, v = (t.contiguous() for t in (q, k, v))  # views into linear_qkv's output
            return self.linear_proj(attend(self.core_attention, q, k, v, attention_mask,
                                           recompute))
        # [s, b, heads, d] -> [b, heads, s, d] for scaled_dot_product_attention
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        mask = None if attention_mask is None else ~attention_mask
        is_causal = mask is None
        if inference_context is not None:
            k, v = inference_context.append_key_value(self.layer_number, k, v)
            if inference_context.sequence_len_offset > 0:  # SDPA's causal is top-left aligned
                is_causal = False
                if mask is None:
                    mask = inference_context.causal_mask(s, q.device)
        if recompute:  # selective recomputation: keep q, k, v, not the attention's output
            out = self._checkpoint(self._core, q, k, v, mask, is_causal)
        else:
            out = self._core(q, k, v, mask, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads_per_rank * self.head_dim)
        return self.linear_proj(out)
