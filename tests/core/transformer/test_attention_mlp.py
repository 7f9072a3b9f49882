"""Attention (GQA, RoPE, causal) and MLP (GELU, SwiGLU) against reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb

# fp32, same math in another operation order (explicit softmax vs fused SDPA kernels).
RTOL, ATOL = 1e-5, 1e-5


def rope_by_pairs(t, base):
    """Rotate channel pairs (i, i + d/2) of t [s, b, heads, d] by pos * base^(-2i/d)."""
    s, d = t.shape[0], t.shape[-1]
    out = t.clone()
    for pos in range(s):
        for i in range(d // 2):
            angle = pos * base ** (-2 * i / d)
            a, b = t[pos, ..., i], t[pos, ..., i + d // 2]
            out[pos, ..., i] = a * math.cos(angle) - b * math.sin(angle)
            out[pos, ..., i + d // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_rope_rotates_channel_pairs():
    t = torch.randn(6, 2, 3, 8)
    rotary = RotaryEmbedding(8, rotary_base=100)(6)
    torch.testing.assert_close(apply_rotary_pos_emb(t, rotary), rope_by_pairs(t, 100),
                               rtol=RTOL, atol=ATOL)


def test_partial_rope_leaves_the_rest():
    t = torch.randn(5, 1, 2, 8)
    out = apply_rotary_pos_emb(t, RotaryEmbedding(8, rotary_percent=0.5)(5))
    torch.testing.assert_close(out[..., 4:], t[..., 4:])
    torch.testing.assert_close(out[..., :4], rope_by_pairs(t[..., :4], 10000),
                               rtol=RTOL, atol=ATOL)


def reference_attention(attn, x, heads, groups, head_dim, rope_base=None):
    """Project with linear_qkv's per-group [q.., k, v] layout, explicit causal softmax."""
    s, b, _ = x.shape
    qkv = F.linear(x, attn.linear_qkv.weight, attn.linear_qkv.bias)
    qkv = qkv.view(s, b, groups, heads // groups + 2, head_dim)
    q = qkv[:, :, :, :-2].reshape(s, b, heads, head_dim)
    k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
    if rope_base is not None:
        q, k = rope_by_pairs(q, rope_base), rope_by_pairs(k, rope_base)
    k = k.repeat_interleave(heads // groups, dim=2)
    v = v.repeat_interleave(heads // groups, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(head_dim)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, b, heads * head_dim)
    return F.linear(out, attn.linear_proj.weight, attn.linear_proj.bias)


@pytest.mark.parametrize("groups", [4, 2, 1])
@pytest.mark.parametrize("rope", [False, True])
def test_attention_matches_reference(groups, rope):
    set_random_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            num_query_groups=groups, attention_dropout=0.0,
                            position_embedding_type="rope" if rope else "learned_absolute")
    attn = SelfAttention(cfg, layer_number=1)
    x = torch.randn(7, 2, 32)
    rotary = RotaryEmbedding(8)(7) if rope else None
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rotary_pos_emb=rotary),
                                   reference_attention(attn, x, 4, groups, 8,
                                                       10000 if rope else None),
                                   rtol=RTOL, atol=ATOL)
    assert attn.linear_qkv.weight.shape == ((4 + 2 * groups) * 8, 32)


def test_attention_is_causal():
    set_random_seed(0)
    attn = SelfAttention(TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                           attention_dropout=0.0), 1)
    x = torch.randn(6, 1, 16)
    y = x.clone()
    y[4:] = torch.randn(2, 1, 16)  # changing the future must not change the past
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[:4], attn(y)[:4])


def test_explicit_mask_equals_causal():
    set_random_seed(0)
    attn = SelfAttention(TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                           attention_dropout=0.0), 1)
    x = torch.randn(6, 2, 16)
    masked = torch.ones(6, 6, dtype=torch.bool).triu(1).expand(2, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, attention_mask=masked), attn(x),
                                   rtol=RTOL, atol=ATOL)


def test_gelu_mlp():
    set_random_seed(0)
    mlp = MLP(TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2))
    assert mlp.linear_fc1.weight.shape == (64, 16)
    x = torch.randn(3, 2, 16)
    expected = F.linear(F.gelu(F.linear(x, mlp.linear_fc1.weight, mlp.linear_fc1.bias)),
                        mlp.linear_fc2.weight, mlp.linear_fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, rtol=RTOL, atol=ATOL)


def test_swiglu_mlp_and_default_width():
    set_random_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=96, num_attention_heads=2,
                            gated_linear_unit=True, add_bias_linear=False)
    assert cfg.ffn_hidden_size == 256  # Megatron: int(4 * 96 * 2 / 3 / 64) * 64
    mlp = MLP(cfg)
    gate_w, up_w = mlp.linear_fc1.weight.chunk(2)
    x = torch.randn(3, 2, 96)
    expected = F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), mlp.linear_fc2.weight)
    assert mlp.linear_fc1.bias is None and mlp.linear_fc2.bias is None
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, rtol=RTOL, atol=ATOL)


def test_scaled_init_of_output_projections():
    set_random_seed(0)
    cfg = TransformerConfig(num_layers=8, hidden_size=256, num_attention_heads=4,
                            init_method_std=0.02)
    attn, mlp = SelfAttention(cfg, 1), MLP(cfg)
    # std of ~65k samples is within 2% of the truth
    assert abs(attn.linear_qkv.weight.std().item() - 0.02) < 0.02 * 0.02
    assert abs(attn.linear_proj.weight.std().item() - 0.02 / 4) < 0.005 * 0.02
    assert abs(mlp.linear_fc2.weight.std().item() - 0.02 / 4) < 0.005 * 0.02
    assert torch.count_nonzero(attn.linear_qkv.bias) == 0
