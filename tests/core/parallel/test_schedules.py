"""Schedule orders: every step once, dependencies respected, bounded micro-batches in flight."""

import pytest

from megatron.core.pipeline_parallel.schedules import interleaved_order, one_f_one_b_order


def in_flight(steps):
    live = peak = 0
    for kind, _, _ in steps:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 2), (3, 7)])
def test_one_f_one_b(p, m):
    for rank in range(p):
        steps = one_f_one_b_order(p, rank, m)
        assert sorted(steps) == sorted([("F", 0, i) for i in range(m)] +
                                       [("B", 0, i) for i in range(m)])
        done = set()
        for kind, _, i in steps:
            assert kind == "F" or ("F", i) in done  # a backward follows its forward
            done.add((kind, i))
        # warm-up of p - rank - 1 forwards: stage 0 never holds more than p micro-batches
        assert in_flight(steps) == min(p - rank, m)


@pytest.mark.parametrize("p,v,m", [(2, 2, 4), (4, 2, 8), (2, 3, 2), (4, 2, 4)])
def test_interleaved(p, v, m):
    everything = sorted((kind, c, i) for kind in "FB" for c in range(v) for i in range(m))
    for rank in range(p):
        steps = interleaved_order(p, rank, v, m)
        assert sorted(steps) == everything
        seen = set()
        for kind, c, i in steps:
            if kind == "F" and c > 0:
                assert ("F", c - 1, i) in seen or rank > 0  # the previous chunk ran first
            if kind == "B":
                assert ("F", c, i) in seen
            seen.add((kind, c, i))
        # each chunk sees its micro-batches in order (one data iterator per chunk)
        for c in range(v):
            assert [i for k, cc, i in steps if k == "F" and cc == c] == list(range(m))
    assert in_flight(interleaved_order(p, 0, v, m)) <= min((p - 1) * 2 + (v - 1) * p + 1, m * v)
