"""--transformer-impl transformer_engine, wired to a CPU stand-in of TransformerEngine
(tests/fake_transformer_engine.py: TE's names, keywords and parallel semantics in full
precision). What is checked is our side: which TE module sits where for each placement, the
process groups and sequence-parallel flags handed to TE, the weights' initialization and
split attributes, checkpoint names, and the FP8 recipe and amax group. The keywords themselves
are checked against TE's source in test_transformer_engine_api.py."""

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.extensions.transformer_engine import checkpoint_name, is_extra_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from tests import fake_transformer_engine as fake_te
from tests.core.parallel.test_tensor_parallel_model import (
    PLACEMENTS,
    VOCAB,
    compare_with_one_process,
)
from tests.helpers import run_distributed

TE = "transformer_engine"


def make_config(placement, impl, tp=1, sp=False, **extra):
    options = dict(PLACEMENTS[placement], **extra)
    return TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=8,
                             num_query_groups=4, norm_placement=placement, hidden_dropout=0.0,
                             attention_dropout=0.0, max_position_embeddings=32,
                             tensor_model_parallel_size=tp, sequence_parallel=sp,
                             transformer_impl=impl, init_seed=3, qk_layernorm=True, **options)


def build(placement, impl, **kw):
    with fake_te.installed():
        return GPTModel(make_config(placement, impl, **kw), VOCAB)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_which_te_module_holds_each_norm(placement):
    model = build(placement, TE)
    for layer in model.decoder.layers:
        fused = {name for name in layer.input_norms if name in layer.norm_names}
        for name in layer.norm_names:
            module = getattr(layer, name)
            if name in fused:  # computed by the next projection
                assert isinstance(module, torch.nn.Identity), name
            else:  # Peri-LN's output norms, Post-LN's norms: separate TE norms
                assert type(module).__name__ in ("LayerNorm", "RMSNorm"), name
        attn_qkv = type(layer.self_attention.linear_qkv).__name__
        assert attn_qkv == ("LayerNormLinear" if "input_layernorm" in fused else "Linear")
        assert type(layer.mlp.linear_fc1).__name__ == \
            ("LayerNormLinear" if "pre_mlp_layernorm" in fused else "Linear")
        assert type(layer.self_attention.core_attention).__name__ == "DotProductAttention"
    if model.decoder.final_layernorm is not None:
        assert type(model.decoder.final_layernorm).__module__.startswith(TE)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_same_model_and_logits_as_local(placement):
    """Same seed, same initial weights under the same names, same logits: the TE layers are
    a different implementation of the same model."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16))
    pos = torch.arange(16).expand_as(ids)
    local, te = build(placement, "local"), build(placement, TE)
    te_state = {checkpoint_name(k): v for k, v in te.state_dict().items()
                if not is_extra_state(k)}
    assert te_state.keys() == local.state_dict().keys()
    for name, value in local.state_dict().items():
        assert torch.equal(te_state[name], value), name
    with fake_te.installed():
        torch.testing.assert_close(te(ids, pos), local(ids, pos), rtol=0, atol=0)


def _te_tensor_parallel(tp):
    """TE layers at tp ranks (with and without sequence parallelism) against the local layers
    in one process: logits, loss and every gradient (under the local names)."""
    dist.init_process_group("gloo")
    with fake_te.installed():
        failures = compare_with_one_process(
            tp, lambda placement: make_config(placement, "local"),
            lambda placement, tp, sp: make_config(placement, TE, tp, sp), checkpoint_name)
    dist.destroy_process_group()
    return failures


def test_tensor_and_sequence_parallel_on_our_groups():
    assert run_distributed(_te_tensor_parallel, 2, 2) == [[], []]


def test_fp8_runs_layers_in_te_autocast_with_the_flags_recipe():
    from megatron.core.fp8 import FP8Recipe
    fake_te.ENTERED.clear()
    for recipe, expected in (("delayed", "DelayedScaling"),
                             ("tensorwise", "Float8CurrentScaling")):
        fake_te.ENTERED.clear()
        with fake_te.installed():
            fp8 = FP8Recipe(format="e4m3", recipe=recipe, amax_history_len=16,
                            amax_compute_algo="max", margin=1)
            model = GPTModel(make_config("peri", TE, fp8=fp8), VOCAB)
            ids = torch.randint(0, VOCAB, (2, 16))
            model(ids, torch.arange(16).expand_as(ids))
        assert len(fake_te.ENTERED) == 1  # one region around this stage's layers
        te_recipe, group = fake_te.ENTERED[0]
        assert type(te_recipe).__name__ == expected
        assert te_recipe.fp8_format is fake_te.Format.E4M3
        if recipe == "delayed":
            assert (te_recipe.margin, te_recipe.amax_history_len,
                    te_recipe.amax_compute_algo) == (1, 16, "max")
        assert group is ps.get_tensor_and_data_parallel_group()
        # the local FP8 GEMMs are not used under TE
        assert not any(getattr(m, "fp8_meta", None) is not None for m in model.modules())
