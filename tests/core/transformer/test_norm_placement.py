"""Each placement's layer against its formula written out by hand, and the norms it owns."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import (
    PeriNormLayer,
    PostNormLayer,
    PreNormLayer,
    TransformerBlock,
    TransformerConfig,
    build_layer,
)
from megatron.core.transformer.norms import is_norm

# Two fp32 evaluations of the same formula in a different operation order agree to a few
# ulps of values of order 1; 1e-5 leaves room for that and nothing else.
RTOL, ATOL = 1e-5, 1e-5


def config(placement, normalization="LayerNorm", **kw):
    return TransformerConfig(num_layers=kw.pop("num_layers", 4), hidden_size=32,
                             num_attention_heads=4, norm_placement=placement,
                             normalization=normalization, hidden_dropout=0.0,
                             attention_dropout=0.0, **kw)


def by_hand_norm(x, norm, normalization):
    """LayerNorm / RMSNorm written out from the module's own gain (and bias)."""
    eps = norm.eps
    if normalization == "LayerNorm":
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * norm.weight


def randomize_norms(module):
    """Distinct gains and biases, so that a norm used in the wrong place changes the output."""
    with torch.no_grad():
        for m in module.modules():
            if is_norm(m):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5)


def expected_output(layer, x, normalization):
    """The residual steps of DESIGN.md's table, F = attention then MLP."""
    N = lambda name, v: by_hand_norm(v, getattr(layer, name), normalization)  # noqa: E731
    attn, mlp = layer.self_attention, layer.mlp
    if isinstance(layer, PreNormLayer):          # x = x + F(N(x))
        x = x + attn(N("input_layernorm", x))
        return x + mlp(N("pre_mlp_layernorm", x))
    if isinstance(layer, PostNormLayer):         # x = N(x + F(x))
        x = N("self_attn_residual_layernorm", x + attn(x))
        return N("mlp_residual_layernorm", x + mlp(x))
    assert isinstance(layer, PeriNormLayer)      # x = x + N_out(F(N_in(x)))
    x = x + N("post_self_attn_layernorm", attn(N("input_layernorm", x)))
    return x + N("post_mlp_layernorm", mlp(N("pre_mlp_layernorm", x)))


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("placement,layer_class", [
    ("pre", PreNormLayer), ("post", PostNormLayer), ("peri", PeriNormLayer)])
def test_layer_matches_formula(placement, layer_class, normalization):
    set_random_seed(0)
    layer = build_layer(config(placement, normalization), layer_number=1)
    assert type(layer) is layer_class
    randomize_norms(layer)
    x = torch.randn(8, 2, 32) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected_output(layer, x, normalization),
                                   rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("placement,norms", [
    ("pre", {"input_layernorm", "pre_mlp_layernorm"}),
    ("post", {"self_attn_residual_layernorm", "mlp_residual_layernorm"}),
    ("peri", {"input_layernorm", "post_self_attn_layernorm", "pre_mlp_layernorm",
              "post_mlp_layernorm"}),
])
def test_layer_owns_exactly_its_norms(placement, norms):
    layer = build_layer(config(placement), layer_number=1)
    found = {name for name, m in layer.named_modules() if is_norm(m)}
    assert found == norms
    # each norm is its own module with its own parameters
    params = [id(p) for name in norms for p in getattr(layer, name).parameters()]
    assert len(params) == len(set(params)) == 2 * len(norms)


@pytest.mark.parametrize("placement,has_final", [("pre", True), ("post", False),
                                                 ("peri", True), ("mix", True)])
def test_final_norm(placement, has_final):
    block = TransformerBlock(config(placement))
    assert (block.final_layernorm is not None) == has_final


@pytest.mark.parametrize("num_layers,alpha,n_post", [(4, 0.25, 1), (8, 0.25, 2), (6, 0.25, 2),
                                                     (10, 0.25, 3), (4, 0.0, 0), (4, 1.0, 4)])
def test_mix_uses_post_for_leading_layers(num_layers, alpha, n_post):
    block = TransformerBlock(config("mix", num_layers=num_layers, mix_ln_alpha=alpha))
    kinds = [type(layer) for layer in block.layers]
    assert kinds == [PostNormLayer] * n_post + [PreNormLayer] * (num_layers - n_post)
    assert [layer.layer_number for layer in block.layers] == list(range(1, num_layers + 1))


def test_mix_follows_global_layer_number():
    """A stage holding layers 3..4 of a mix model builds them as the whole model would."""
    cfg = config("mix", num_layers=4, mix_ln_alpha=0.5)
    stage = TransformerBlock(cfg, layer_numbers=[2, 3, 4])
    assert [type(layer) for layer in stage.layers] == [PostNormLayer, PreNormLayer, PreNormLayer]


def test_norm_counts_in_whole_model():
    counts = {}
    for placement in ("pre", "post", "peri", "mix"):
        model = GPTModel(config(placement), vocab_size=64)
        counts[placement] = sum(is_norm(m) for m in model.modules())
    # 4 layers: 2 per layer (+ final) for pre/post/mix, 4 per layer + final for peri
    assert counts == {"pre": 9, "post": 8, "peri": 17, "mix": 9}


@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_embedding_norm(placement):
    set_random_seed(0)
    cfg = config(placement, embedding_norm=True)
    model = GPTModel(cfg, vocab_size=64)
    randomize_norms(model)
    norm = model.embedding.embedding_norm
    assert norm is not None and is_norm(norm)
    ids = torch.randint(0, 64, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    raw = (F.embedding(ids, model.embedding.word_embeddings.weight) +
           model.embedding.position_embeddings(pos)).transpose(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.embedding(ids, pos),
                                   by_hand_norm(raw, norm, "LayerNorm"), rtol=RTOL, atol=ATOL)
    assert GPTModel(config(placement), vocab_size=64).embedding.embedding_norm is None


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="norm_placement=side"):
        config("side")
