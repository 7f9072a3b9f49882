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
