"""At tensor-parallel size 1 the parallel layers are exactly torch's plain layers."""

import random

import numpy as np
import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_rng_tracker,
    set_random_seed,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.random import get_rng_state, set_rng_state


def init(t):
    return torch.nn.init.normal_(t, std=0.1)


def test_column_and_row_are_linear():
    x = torch.randn(5, 3, 8)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        layer = cls(8, 6, init_method=init)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0,
                                   atol=0)
        assert layer.weight.shape == (6, 8)


def test_column_with_passed_weight():
    layer = ColumnParallelLinear(8, 6, init_method=init, bias=False,
                                 skip_weight_param_allocation=True)
    assert layer.weight is None and list(layer.parameters()) == []
    w, x = torch.randn(6, 8), torch.randn(2, 8)
    torch.testing.assert_close(layer(x, weight=w), x @ w.t(), rtol=0, atol=0)


def test_vocab_embedding_is_embedding():
    emb = VocabParallelEmbedding(20, 4, init_method=init)
    ids = torch.randint(0, 20, (3, 5))
    torch.testing.assert_close(emb(ids), emb.weight[ids], rtol=0, atol=0)


def test_cross_entropy_matches_torch():
    logits = torch.randn(6, 2, 11, requires_grad=True)
    target = torch.randint(0, 11, (6, 2))
    before = logits.detach().clone()
    loss = vocab_parallel_cross_entropy(logits, target)
    reference = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(reference.reshape(-1, 11), target.reshape(-1),
                               reduction="none").view(6, 2)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)  # the same log_softmax kernel
    loss.sum().backward()
    expected.sum().backward()
    # (softmax - one-hot) * g vs softmax * g - one-hot * g: an ulp apart in fp32
    torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(logits.detach(), before)  # not overwritten unless asked


def test_cross_entropy_over_the_logits():
    """reuse_logits: log-probabilities written over the logits (odd and large vocabularies:
    torch's kernel must finish reading each row before it writes it)."""
    for shape in ((3, 2, 8191), (2, 2, 50304), (2, 1, 131072)):
        logits = torch.randn(*shape, requires_grad=True)
        target = torch.randint(0, shape[-1], shape[:-1])
        weights = torch.rand(shape[:-1])
        temp = logits * 1.0  # the model's own temporary, overwritten
        loss = vocab_parallel_cross_entropy(temp, target, reuse_logits=True)
        reference = logits.detach().clone().requires_grad_()
        expected = F.cross_entropy(reference.reshape(-1, shape[-1]), target.reshape(-1),
                                   reduction="none").view(shape[:-1])
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        (loss * weights).sum().backward()
        (expected * weights).sum().backward()
        torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-6, atol=1e-7)


def test_rng_tracker_forks_and_restores():
    set_random_seed(5)
    before = torch.get_rng_state()
    with get_rng_tracker().fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with get_rng_tracker().fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the tracked stream advances


def test_rng_state_roundtrip():
    set_random_seed(7)
    state = get_rng_state()
    first = (torch.rand(4), np.random.rand(2), random.random())
    with get_rng_tracker().fork():
        tracked = torch.rand(2)
    set_rng_state(state)
    again = (torch.rand(4), np.random.rand(2), random.random())
    with get_rng_tracker().fork():
        tracked_again = torch.rand(2)
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all()
    assert first[2] == again[2] and torch.equal(tracked, tracked_again)


def test_shards_split_and_merge_like_the_layers():
    from megatron.core.tensor_parallel.utils import merge_shards, split_to_shards
    full = torch.arange(24.0).view(8, 3)  # SwiGLU-like: rows 0-3 gate, rows 4-7 up
    shards = split_to_shards(full, 2, dim=0, stride=2)
    # each rank holds its share of both blocks: [gate_r; up_r]
    assert shards[0][:, 0].tolist() == [0.0, 3.0, 12.0, 15.0]
    assert shards[1][:, 0].tolist() == [6.0, 9.0, 18.0, 21.0]
    assert torch.equal(merge_shards(shards, 0, stride=2), full)
    assert torch.equal(merge_shards(split_to_shards(full, 4, dim=0), 0), full)
