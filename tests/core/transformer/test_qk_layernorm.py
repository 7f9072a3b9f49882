"""--qk-layernorm (per-head norms of queries and keys before RoPE) and --apply-layernorm-1p
(zero-centred gains): the math against hand-written references, parameter names and marks,
weight decay, loss curves and grad norms at TP x PP (+SP) equal to one process, and checkpoint
refusal naming the flag."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import get_param_groups
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.norms import is_norm
from megatron.core.transformer.rope import RotaryEmbedding
from tests.core.transformer.test_attention_mlp import rope_by_pairs
from tests.helpers import TINY_MODEL, lm_losses, run_distributed, run_pretrain

# fp32, the same math in another operation order (explicit softmax vs fused SDPA).
RTOL, ATOL = 1e-5, 1e-5


def _config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                hidden_dropout=0.0, attention_dropout=0.0, qk_layernorm=True,
                position_embedding_type="rope", rotary_base=100)
    return TransformerConfig(**{**base, **kw})


def _norm(t, weight, bias, kind, eps):
    """LayerNorm / RMSNorm over the last dim, written out."""
    if kind == "LayerNorm":
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True)
                                                        + eps)
        return t * weight + bias
    return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("one_p", [False, True])
def test_attention_normalizes_each_head_before_rope(kind, one_p):
    """megatron-core's order (get_query_key_value_tensors, then rotary): split per query
    group, q [s, b, heads, d] and k [s, b, groups, d] through their norms over d, then RoPE."""
    torch.manual_seed(0)
    eps = 1e-3  # large enough that a wrong epsilon shows
    config = _config(normalization=kind, norm_epsilon=eps, layernorm_zero_centered_gamma=one_p)
    attn = SelfAttention(config, 1)
    d, heads, groups = 8, 4, 2
    for norm in (attn.q_layernorm, attn.k_layernorm):
        assert tuple(norm.weight.shape) == (d,)
        assert torch.equal(norm.weight, torch.zeros(d) if one_p else torch.ones(d))
        with torch.no_grad():
            for p in norm.parameters():
                p.normal_(0.0, 0.5)
    x = torch.randn(6, 2, 32)
    out = attn(x, rotary_pos_emb=RotaryEmbedding(d, rotary_base=100)(6))

    qkv = F.linear(x, attn.linear_qkv.weight, attn.linear_qkv.bias)
    qkv = qkv.view(6, 2, groups, heads // groups + 2, d)
    q, k, v = qkv[:, :, :, :-2].reshape(6, 2, heads, d), qkv[:, :, :, -2], qkv[:, :, :, -1]
    gain = (lambda w: w + 1) if one_p else (lambda w: w)
    bias = (lambda n: n.bias) if kind == "LayerNorm" else (lambda n: None)
    q = _norm(q, gain(attn.q_layernorm.weight), bias(attn.q_layernorm), kind, eps)
    k = _norm(k, gain(attn.k_layernorm.weight), bias(attn.k_layernorm), kind, eps)
    q, k = rope_by_pairs(q, 100), rope_by_pairs(k, 100)
    k, v = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    probs = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    ctx = torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(6, 2, heads * d)
    expected = F.linear(ctx, attn.linear_proj.weight, attn.linear_proj.bias)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_zero_centred_norm_applies_one_plus_gain(kind):
    """Every norm of the model (embedding, peri output, final, q/k) starts at zero gain and
    computes the plain norm with gain 1 + weight."""
    config = _config(normalization=kind, norm_placement="peri", embedding_norm=True,
                     layernorm_zero_centered_gamma=True)
    model = GPTModel(config, 128)
    norms = {n: m for n, m in model.named_modules() if is_norm(m)}
    assert len(norms) == 1 + 2 * (4 + 2) + 1  # embedding, per layer 4 + q/k, final
    plain = (torch.nn.LayerNorm if kind == "LayerNorm" else torch.nn.RMSNorm)(32, eps=1e-5)
    for name, norm in norms.items():
        assert torch.equal(norm.weight, torch.zeros_like(norm.weight)), name
    norm = norms["decoder.layers.1.post_mlp_layernorm"]
    with torch.no_grad():
        norm.weight.normal_()
        plain.weight.copy_(norm.weight + 1)
        if kind == "LayerNorm":
            norm.bias.normal_()
            plain.bias.copy_(norm.bias)
    x = torch.randn(5, 32)
    torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=0)


def test_names_marks_and_weight_decay():
    """megatron-core's names and shapes; replicated on every TP rank (counted once in the grad
    norm, never split by a checkpoint); their gradients summed over TP, not as SP norms;
    no weight decay, as Megatron-LM's default (1-D parameters; --apply-wd-to-qk-layernorm is
    not a flag here)."""
    from megatron.training.checkpoint_layout import partition_of
    config = _config(normalization="LayerNorm", sequence_parallel=True,
                     tensor_model_parallel_size=1, layernorm_zero_centered_gamma=True)
    model = GPTModel(config, 128)
    params = dict(model.named_parameters())
    for layer in range(2):
        for which in ("q", "k"):
            for kind in ("weight", "bias"):
                name = f"decoder.layers.{layer}.self_attention.{which}_layernorm.{kind}"
                p = params[name]
                assert tuple(p.shape) == (8,)
                assert not getattr(p, "tensor_model_parallel", False)
                assert p.tensor_parallel_partial_grad and not p.sequence_parallel
                assert partition_of(name, False) == (None, 1)
    assert params["decoder.layers.0.input_layernorm.weight"].sequence_parallel
    no_decay = {id(p) for g in get_param_groups([model]) if g["wd_mult"] == 0.0
                for p in g["params"]}
    assert all(id(p) in no_decay for n, p in params.items() if "layernorm" in n)


# --- parity with one process ---------------------------------------------------------------

ITERS = 8
RUN = TINY_MODEL + ["--num-layers", "4", "--train-iters", str(ITERS), "--hidden-dropout", "0",
                    "--attention-dropout", "0", "--micro-batch-size", "2",
                    "--global-batch-size", "8", "--lr-warmup-iters", "2", "--qk-layernorm",
                    "--apply-layernorm-1p", "--clip-grad", "0.5"]
PLACEMENTS = {"pre": ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type",
                      "rope", "--group-query-attention", "--num-query-groups", "2"],
              "peri": ["--embedding-norm"]}
LAYOUTS = [(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
             "--sequence-parallel"], ("pre", "peri")),
           (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
            ("peri",))]


def _curves(lines):
    """{iteration: (lm loss, grad norm)} from the log lines."""
    out = {}
    for line in lines:
        m = re.search(r"iteration\s+(\d+)/.*\| lm loss: (\S+) \|.*\| grad norm: (\S+) \|", line)
        if m:
            out[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return out


def _train(placement_runs):
    out = []
    for run in placement_runs:
        code, lines = run_pretrain(run)
        out.append((code, _curves(lines), lines[-3:]))
    return out


def test_tp_pp_sp_curves_and_grad_norms_equal_one_process():
    """TP2 x PP2 with and without SP: the q/k norms' gradients must be summed over TP (each
    rank saw only its heads) and counted once in the grad norm. A missing sum splits the
    ranks' copies; a doubled count changes the grad norm (and, clipped at 0.5, the update)."""
    runs = [RUN + PLACEMENTS[p] + layout + ["--norm-placement", p]
            for layout, placements in LAYOUTS for p in placements]
    distributed = run_distributed(_train, 4, runs)[-1]
    ones = {p: _train([RUN + PLACEMENTS[p] + ["--norm-placement", p]])[0] for p in PLACEMENTS}
    labels = [(layout, p) for layout, placements in LAYOUTS for p in placements]
    for (layout, p), (code, curve, tail) in zip(labels, distributed):
        one_code, one, one_tail = ones[p]
        assert code == 0 and one_code == 0, (tail, one_tail)
        assert sorted(curve) == sorted(one) == list(range(1, ITERS + 1))
        for i in one:
            # fp32 sums split over ranks round differently; a few Adam steps grow those ulps
            # to ~1e-6 (see tests/helpers.assert_same_curves)
            assert curve[i][0] == pytest.approx(one[i][0], rel=1e-4), (layout, p, i)
            assert curve[i][1] == pytest.approx(one[i][1], rel=1e-3), (layout, p, i)
        assert one[1][1] > 0.5  # clipping is active, so grad-norm errors change the losses


def test_checkpoint_with_another_setting_is_refused_naming_the_flag(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    base = TINY_MODEL + ["--train-iters", "1", "--hidden-dropout", "0"]
    code, lines = run_pretrain(base + ["--qk-layernorm", "--save", ckpt])
    assert code == 0, lines[-3:]
    assert lm_losses(lines)
    for flags, named in (([], "--qk-layernorm"),
                         (["--qk-layernorm", "--apply-layernorm-1p"], "--apply-layernorm-1p")):
        code, lines = run_pretrain(base + flags + ["--load", ckpt, "--train-iters", "2"])
        errors = [line for line in lines if "error:" in line]
        assert code != 0 and len(errors) == 1 and named in errors[0], lines[-3:]

