"""GPTModel: embeddings, tied or untied output layer, and the loss it returns."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig


def model(**kw):
    set_random_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            hidden_dropout=0.0, attention_dropout=0.0,
                            max_position_embeddings=16, **kw)
    return GPTModel(cfg, vocab_size=128)


def inputs(b=2, s=10):
    ids = torch.randint(0, 128, (b, s))
    return ids, torch.arange(s).expand(b, s)


def test_tied_output_layer_uses_the_embedding():
    m = model()
    names = dict(m.named_parameters())
    assert "output_layer.weight" not in names
    ids, pos = inputs()
    with torch.no_grad():
        hidden = m.decoder(m.embedding(ids, pos))
        expected = (hidden @ m.embedding.word_embeddings.weight.t()).transpose(0, 1)
        torch.testing.assert_close(m(ids, pos), expected, rtol=1e-6, atol=1e-6)


def test_untied_output_layer_has_its_own_weight():
    m = model(share_embeddings_and_output_weights=False)
    assert m.output_layer.weight.shape == (128, 32)
    assert m.output_layer.weight.data_ptr() != m.embedding.word_embeddings.weight.data_ptr()
    ids, pos = inputs()
    m(ids, pos, labels=ids).mean().backward()
    assert m.output_layer.weight.grad is not None


@pytest.mark.parametrize("kind", ["learned_absolute", "rope"])
def test_position_embedding_type(kind):
    m = model(position_embedding_type=kind)
    assert hasattr(m.embedding, "position_embeddings") == (kind == "learned_absolute")
    assert (m.rotary_pos_emb is not None) == (kind == "rope")
    ids, pos = inputs()
    assert m(ids, pos).shape == (2, 10, 128)


def test_loss_is_cross_entropy_of_logits():
    m = model(normalization="RMSNorm", gated_linear_unit=True, num_query_groups=2)
    ids, pos = inputs()
    labels = torch.randint(0, 128, ids.shape)
    with torch.no_grad():
        logits = m(ids, pos)
        expected = F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1),
                                   reduction="none").view(2, 10)
        torch.testing.assert_close(m(ids, pos, labels=labels), expected, rtol=1e-6, atol=1e-6)


def test_parameter_names_follow_megatron_core():
    names = set(dict(model(norm_placement="peri").named_parameters()))
    for name in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                 "decoder.layers.0.input_layernorm.weight",
                 "decoder.layers.0.self_attention.linear_qkv.weight",
                 "decoder.layers.0.self_attention.linear_proj.weight",
                 "decoder.layers.0.post_self_attn_layernorm.weight",
                 "decoder.layers.1.pre_mlp_layernorm.weight",
                 "decoder.layers.1.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc2.weight",
                 "decoder.layers.1.post_mlp_layernorm.weight", "decoder.final_layernorm.weight"):
        assert name in names, name
