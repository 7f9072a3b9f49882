"""Context-parallel attention (ring and all-gather) against one process's attention over the
whole sequence: outputs and the gradients of q, k and v, causal and with document masks;
per-rank attention FLOPs balanced; the batch split and its bad input."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron.core import ConfigError
from megatron.core import parallel_state as ps
from megatron.core.datasets.gpt_dataset import document_ids
from megatron.core.transformer import context_parallel as cp
from tests.helpers import run_distributed

B, HEADS, GROUPS, D = 2, 4, 2, 8


def _inputs(seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HEADS, seq, D, generator=g)
    k = torch.randn(B, GROUPS, seq, D, generator=g)
    v = torch.randn(B, GROUPS, seq, D, generator=g)
    dout = torch.randn(B, HEADS, seq, D, generator=g)
    # two samples: documents of lengths 5, 20, 1, ... and one document
    ids = torch.stack([document_ids(torch.tensor([1 if i in (4, 24, 25, 40) else 0
                                                     for i in range(seq)]), 1),
                       torch.zeros(seq, dtype=torch.long)])
    return q, k, v, dout, ids


def _reference(q, k, v, dout, ids):
    """One process: SDPA over the whole sequence with the dense mask."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = None if ids is None else ~cp.document_attention_mask(ids)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(HEADS // GROUPS, 1),
                                         v.repeat_interleave(HEADS // GROUPS, 1),
                                         attn_mask=mask, is_causal=mask is None)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _compare(cp_size, seq):
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(context_parallel_size=cp_size)
    r = ps.get_context_parallel_rank()
    index = cp.local_positions(seq, cp_size, r)
    problems, flops = [], {}
    for with_ids in (False, True):
        q, k, v, dout, ids = _inputs(seq)
        ids = ids if with_ids else None
        expected = [t.index_select(2, index) for t in _reference(q, k, v, dout, ids)]
        for comm in ("p2p", "all_gather"):
            mine = [t.index_select(2, index).clone().requires_grad_() for t in (q, k, v)]
            with FlopCounterMode(display=False) as counter:
                out = cp.attention(*mine, document_ids=ids, comm_type=comm)
                out.backward(dout.index_select(2, index))
            flops[(with_ids, comm)] = counter.get_total_flops()
            got = [out.detach()] + [t.grad for t in mine]
            for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
                # fp32; the merge by log-sum-exp reorders the softmax sums: a few ulps
                if not torch.allclose(g, e, rtol=1e-5, atol=1e-6):
                    problems.append((with_ids, comm, name, float((g - e).abs().max())))
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return problems, flops


@pytest.mark.parametrize("cp_size", [2, 4])
def test_attention_matches_one_process_and_balances_flops(cp_size):
    seq = 48
    results = run_distributed(_compare, cp_size, cp_size, seq)
    assert [problems for problems, _ in results] == [[]] * cp_size
    for key in results[0][1]:
        per_rank = [flops[key] for _, flops in results]
        assert max(per_rank) <= 1.10 * min(per_rank), (key, per_rank)


def _dense_dropout_reference(q, k, v, dout, ids, p, seed):
    """One process, written out: softmax over the whole rows, then the pairs the hash keeps."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    s, g = q.shape[2], HEADS // GROUPS
    kk, vv = (t.repeat_interleave(g, 1) for t in (k, v))
    scores = q @ kk.transpose(-1, -2) / D ** 0.5
    allowed = ~cp.document_attention_mask(ids) if ids is not None else \
        torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    keep = cp._Dropout(p, seed, 0).keep(B, GROUPS, g, torch.arange(s), torch.arange(s))
    out = (probs * keep.reshape(B, HEADS, s, s) / (1 - p)) @ vv
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _compare_dropout(cp_size, seq):
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(context_parallel_size=cp_size)
    index = cp.local_positions(seq, cp_size, ps.get_context_parallel_rank())
    problems = []
    q, k, v, dout, ids = _inputs(seq, seed=2)
    torch.manual_seed(9)
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
    for with_ids in (False, True):
        expected = [t.index_select(2, index) for t in _dense_dropout_reference(
            q, k, v, dout, ids if with_ids else None, 0.3, seed)]
        for comm in ("p2p", "all_gather"):
            mine = [t.index_select(2, index).clone().requires_grad_() for t in (q, k, v)]
            torch.manual_seed(9)  # the kernel draws the same seed
            out = cp.attention(*mine, document_ids=ids if with_ids else None, comm_type=comm,
                               dropout_p=0.3)
            out.backward(dout.index_select(2, index))
            for name, g, e in zip(("out", "dq", "dk", "dv"), [out.detach()] +
                                  [t.grad for t in mine], expected):
                if not torch.allclose(g, e, rtol=1e-5, atol=1e-5):
                    problems.append((with_ids, comm, name, float((g - e).abs().max())))
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return problems


def test_attention_dropout_drops_the_same_pairs_at_every_split():
    """The pairs dropped depend only on the seed and the pair (not on CP size or comm type),
    and backward drops the same ones: equal to the dense computation with that mask."""
    assert run_distributed(_compare_dropout, 2, 2, 48) == [[], []]
    keep = cp._Dropout(0.3, 1234, 0).keep(2, 2, 2, torch.arange(64), torch.arange(64))
    assert abs(keep.float().mean().item() - 0.7) < 0.01  # about 1 - p kept


def _ring_events(cp_size):
    """The order of ring transfers, block computations and waits on one rank."""
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(context_parallel_size=cp_size)
    events = []
    shift, forward, backward, wait = cp._Ring.shift, cp._block_forward, cp._block_backward, \
        cp._wait

    def logged(name, fn):
        def run(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)
        return run
    cp._Ring.shift = lambda ring, t, tag: logged(
        "send kv" if tag == cp._KV_TAG else "send grads", shift)(ring, t, tag)
    cp._block_forward, cp._block_backward = logged("forward", forward), \
        logged("backward", backward)
    cp._wait = logged("wait", wait)
    q, k, v = (t[:, :, :8].clone().requires_grad_() for t in _inputs(8 * cp_size)[:3])
    cp.attention(q, k, v).sum().backward()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return events


def test_ring_overlaps_each_transfer_with_a_block():
    """p2p: the next block's transfer is posted before the current block is computed and waited
    for after it; in backward the key/value gradients follow one step behind."""
    events = run_distributed(_ring_events, 2, 2)[0]
    assert events == ["send kv", "forward", "wait", "forward",  # forward, 2 steps
                      "send kv", "backward", "send grads", "wait",  # backward step 1
                      "backward", "wait", "send grads", "wait"]  # step 2, then own grads


def kernel_against_sdpa(device, dtype):
    """The kernel on one rank (the whole sequence, no communication) against SDPA in fp32 on
    ``device``: the largest differences of the output and of q, k, v's gradients."""
    q, k, v, dout, ids = (t.to(device) for t in _inputs(64))
    expected = _reference(q, k, v, dout, ids)
    mine = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out = cp.attention(*mine, document_ids=ids)
    out.backward(dout.to(dtype))
    return [float((g.float() - e).abs().max()) for g, e in
            zip([out.detach()] + [t.grad for t in mine], expected)]


def test_one_rank_kernel_matches_sdpa():
    """Without a context-parallel group the kernel attends to the whole sequence (the path the
    GPU checks run on CUDA in bf16)."""
    assert max(kernel_against_sdpa("cpu", torch.float32)) < 1e-5


def test_unbalanced_split_would_fail_the_balance_check():
    """The FLOP count the balance test uses can tell: contiguous quarters of a causal sequence
    cost 1:3:5:7 (the first rank's keys are the fewest)."""
    s, n = 64, 4
    q = torch.randn(1, 1, s, D)
    costs = []
    for r in range(n):
        rows = q[:, :, r * s // n:(r + 1) * s // n]
        with FlopCounterMode(display=False) as counter:
            torch.matmul(rows, q[:, :, :(r + 1) * s // n].transpose(-1, -2))
        costs.append(counter.get_total_flops())
    assert max(costs) > 1.10 * min(costs)


def test_local_positions_hold_chunks_r_and_2n_minus_1_minus_r():
    assert cp.local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp.local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    everything = torch.cat([cp.local_positions(16, 4, r) for r in range(4)])
    assert sorted(everything.tolist()) == list(range(16))


def test_split_batch_keeps_document_ids_whole_and_refuses_dense_masks():
    tokens = torch.arange(16).view(2, 8)
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(2, 8),
             "position_ids": tokens % 8, "document_ids": torch.zeros(2, 8, dtype=torch.long)}
    part = cp.split_batch(batch, 2, 1)
    assert part["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert part["position_ids"].tolist() == [[2, 3, 4, 5]] * 2
    assert part["document_ids"].shape == (2, 8)
    with pytest.raises(ConfigError, match="cannot split a dense"):
        cp.split_batch({**batch, "attention_mask": torch.zeros(2, 1, 8, 8, dtype=torch.bool)},
                       2, 0)
    with pytest.raises(ConfigError, match="not divisible by 2 x context_parallel_size=3"):
        cp.split_batch(batch, 3, 0)


def test_document_ids_match_megatrons_reset_attention_mask():
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, _masks_and_positions
    tokens = torch.tensor([5, 3, 0, 4, 4, 0, 0, 7, 2])
    config = GPTDatasetConfig(sequence_length=9, random_seed=0, eod=0, pad=-1,
                              reset_attention_mask=True)
    dense = _masks_and_positions(tokens, config)[2]
    assert torch.equal(cp.document_attention_mask(document_ids(tokens, 0)[None])[0], dense)


def test_comm_types():
    assert cp.normalize_comm_types(["allgather"], 3) == ["all_gather"] * 3
    assert cp.normalize_comm_types(["p2p", "all_gather"], 2) == ["p2p", "all_gather"]
    with pytest.raises(ConfigError, match="a2a"):
        cp.normalize_comm_types("a2a", 2)
    with pytest.raises(ConfigError, match="one per layer"):
        cp.normalize_comm_types(["p2p", "p2p"], 3)


def test_groups_follow_megatrons_rank_order():
    """Megatron-LM's default order tp-cp-ep-dp-pp: rank = t + TP (c + CP (d + DP p))."""
    groups = ps.rank_groups(16, tp=2, pp=2, cp=2)
    assert groups["tp"][:2] == [[0, 1], [2, 3]]
    assert groups["cp"][:2] == [[0, 2], [1, 3]]
    assert groups["dp"][:2] == [[0, 4], [1, 5]]
    assert [0, 2, 4, 6] in groups["dp_cp"] and [1, 3, 5, 7] in groups["dp_cp"]
    assert groups["pp"][0] == [0, 8]
    assert [0, 1, 8, 9] in groups["mp"]  # tensor x pipeline, one per (data, context) rank
    assert groups["tp_dp_cp"] == [list(range(8)), list(range(8, 16))]
    for kind, lists in groups.items():  # every kind covers every rank once
        if kind != "embedding":
            assert sorted(r for ranks in lists for r in ranks) == list(range(16)), kind


def test_sft_samples_give_document_ids_equal_to_their_mask():
    import numpy as np

    from megatron.core.datasets.sft_dataset import SFTDataset
    conversations = [(np.arange(1, n + 2), np.array([0] * (n // 2) + [1] * (n + 1 - n // 2)))
                     for n in (5, 3, 9, 4)]
    dense = SFTDataset(conversations, 16, 4, seed=0)
    ids = SFTDataset(conversations, 16, 4, seed=0, document_ids=True)
    for i in range(4):
        a, b = dense[i], ids[i]
        assert "attention_mask" not in b and b["document_ids"].shape == (16,)
        assert torch.equal(cp.document_attention_mask(b["document_ids"][None])[0],
                           a["attention_mask"])
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(a[key], b[key])
