"""Activation recomputation gives the same loss and gradients as keeping everything (dropout
on: the random states are restored, so the masks repeat) and keeps what it promises: full
recomputation only each checkpointed group's input, selective recomputation less than none.

Each test runs in a fresh process: the kept bytes come from the profiler's allocation events,
which also count frees of blocks that earlier profiled code in the same process allocated (a
whole-package run left enough of those to move the counts by 5%)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig
from tests.helpers import run_distributed

SEQ, BATCH, HIDDEN, LAYERS = 32, 2, 64, 4
FULL = {f"full-{m}-{k}": dict(recompute_granularity="full", recompute_method=m,
                              recompute_num_layers=k)
        for m, k in (("uniform", 1), ("uniform", 2), ("block", 2), ("block", 9))}
SELECTIVE = {f"selective-{'+'.join(mods)}": dict(recompute_granularity="selective",
                                                 recompute_modules=list(mods))
             for mods in (("core_attn",), ("mlp",), ("layernorm",), ("output_norm",),
                          ("core_attn", "mlp", "layernorm", "output_norm"))}


def run(placement, num_layers=LAYERS, seq=SEQ, batch=BATCH, hidden=HIDDEN, **recompute):
    """Loss, every gradient, and the bytes the forward pass left allocated (what is kept for
    backward, measured by the profiler's allocator events; the random generators' bookkeeping
    adds a few kB of noise to it)."""
    set_random_seed(3)
    config = TransformerConfig(num_layers=num_layers, hidden_size=hidden,
                               num_attention_heads=4, norm_placement=placement,
                               normalization="RMSNorm", gated_linear_unit=True,
                               position_embedding_type="rope", hidden_dropout=0.1,
                               attention_dropout=0.1, init_seed=5, **recompute)
    model = GPTModel(config, 128)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (batch, seq))
    pos = torch.arange(seq).expand_as(ids)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(ids, pos, labels=ids.roll(-1, 1)).mean()
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, kept


def _same_loss_and_gradients(placement):
    ref_loss, ref_grads, ref_kept = run(placement)
    for name, recompute in {**FULL, **SELECTIVE}.items():
        loss, grads, kept = run(placement, **recompute)
        # the same operations on the same numbers in the same order: bitwise equal
        assert torch.equal(loss, ref_loss), name
        for param, grad in ref_grads.items():
            assert torch.equal(grads[param], grad), (name, param)
        assert kept <= ref_kept + 16384, name  # plus the noise


def _full_recomputation_keeps_only_each_layers_input(placement):
    """The layers' share of what the forward pass keeps (4 layers minus 2 layers: the
    embedding, output layer and loss keep the same in both) is one [s, b, h] fp32 input per
    layer under full recomputation of every layer, within 5%; without it, many times more.
    Each checkpoint also keeps the random states it restores (the CPU generator's state and
    the tracker's, 5,056 bytes each on a CPU, 16 on a GPU). Shapes large enough that the
    generators' few kB of noise stay under 5%."""
    shape = dict(seq=128, batch=4, hidden=128)
    rng = torch.get_rng_state().numel()
    per_layer = 128 * 4 * 128 * 4 + 2 * rng
    full = dict(recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=1)
    layers_kept = run(placement, 4, **shape, **full)[2] - run(placement, 2, **shape, **full)[2]
    assert layers_kept == pytest.approx(2 * per_layer, rel=0.05)
    plain = run(placement, 4, **shape)[2] - run(placement, 2, **shape)[2]
    assert plain > 8 * per_layer


def _selective_modules_each_keep_less():
    """Each selective part drops what it names, in the placement where it exists."""
    ref = run("peri")[2]
    tensor = SEQ * BATCH * HIDDEN * 4  # one [s, b, h] fp32 activation
    for mods, at_least in ((["core_attn"], LAYERS * tensor), (["mlp"], LAYERS * tensor),
                           (["layernorm"], 2 * LAYERS * tensor),
                           (["output_norm"], 2 * LAYERS * tensor)):
        kept = run("peri", recompute_granularity="selective", recompute_modules=mods)[2]
        assert ref - kept >= at_least * 0.95, (mods, ref - kept)



@pytest.mark.parametrize("placement", ["pre", "post", "peri", "mix"])
def test_same_loss_and_gradients(placement):
    run_distributed(_same_loss_and_gradients, 1, placement)


@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_full_recomputation_keeps_only_each_layers_input(placement):
    run_distributed(_full_recomputation_keeps_only_each_layers_input, 1, placement)


def test_selective_modules_each_keep_less():
    run_distributed(_selective_modules_each_keep_less, 1)
