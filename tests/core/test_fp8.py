"""FP8 numerics without TransformerEngine: scales by hand, GEMMs against fp32 within FP8's
error, delayed scaling over steps, saturation and underflow counts."""

import pytest
import torch

from megatron.core import ConfigError
from megatron.core.fp8 import (
    E4M3,
    E5M2,
    FP8Meta,
    FP8Recipe,
    ScalingState,
    fp8_linear,
    scale_from_amax,
)

# Relative error bounds (||ours - fp32|| / ||fp32||) for random operands: e4m3 keeps 3 mantissa
# bits (rounding error up to 2^-4, about 3.6% rms per element), e5m2 2 bits (about 7.2%); a
# product of two rounded operands errs by about sqrt(2) x that, and summing many products with
# independent errors keeps the relative rms. Measured: 3.8% (e4m3 x e4m3), 6.0% (e5m2 x e4m3).
E4M3_BOUND, E5M2_BOUND = 0.06, 0.10


def test_scale_by_hand():
    prev = torch.tensor(3.0)
    assert float(scale_from_amax(torch.tensor(2.0), 448.0, 0, prev)) == 224.0
    assert float(scale_from_amax(torch.tensor(2.0), 448.0, 1, prev)) == 112.0  # margin halves
    assert float(scale_from_amax(torch.tensor(4.0), 57344.0, 0, prev)) == 14336.0
    for amax in (0.0, float("inf"), float("nan")):  # no information: keep the old scale
        assert float(scale_from_amax(torch.tensor(amax), 448.0, 0, prev)) == 3.0


def test_formats_per_role():
    assert FP8Recipe(format="hybrid").dtype("grad_output") is E5M2
    assert FP8Recipe(format="hybrid").dtype("input") is E4M3
    assert FP8Recipe(format="e4m3").dtype("grad_output") is E4M3
    with pytest.raises(ConfigError, match="e4m3 or hybrid"):
        FP8Recipe(format="e5m2")
    with pytest.raises(ConfigError, match="delayed or tensorwise"):
        FP8Recipe(recipe="blockwise")


def test_tensorwise_scales_from_the_tensor_itself():
    state = ScalingState(FP8Recipe(recipe="tensorwise"), "input")
    x = torch.tensor([0.5, -8.0, 2.0])
    assert float(state.scale_for(x)) == 448.0 / 8.0


def test_delayed_scaling_uses_the_history_of_previous_steps():
    state = ScalingState(FP8Recipe(recipe="delayed", amax_history_len=3), "input")
    assert float(state.scale_for(torch.tensor([4.0]))) == 1.0  # nothing seen yet
    state.scale_for(torch.tensor([-6.0]))  # two micro-batches: the slot keeps the max
    state.step()
    assert float(state.scale) == pytest.approx(448.0 / 6.0)
    state.scale_for(torch.tensor([2.0]))
    state.step()  # history [2, 6, 0]: max 6
    assert float(state.scale) == pytest.approx(448.0 / 6.0)
    state.step()  # history [0, 2, 6]: still 6
    assert float(state.scale) == pytest.approx(448.0 / 6.0)
    state.step()  # 6 has left the 3-step history: [0, 0, 2]
    assert float(state.scale) == pytest.approx(448.0 / 2.0)
    recent = ScalingState(FP8Recipe(amax_history_len=3, amax_compute_algo="most_recent"),
                          "input")
    for amax in (6.0, 2.0):
        recent.scale_for(torch.tensor([amax]))
        recent.step()
    assert float(recent.scale) == pytest.approx(448.0 / 2.0)


def test_saturation_and_underflow_are_counted():
    state = ScalingState(FP8Recipe(recipe="delayed"), "input")  # scale 1 at first
    state.counting = True
    x = torch.tensor([1000.0, -500.0, 1e-12, 0.0, 1.0])
    fp8, inv = state.quantize(x, state.scale_for(x))
    assert fp8.dtype is E4M3 and float(inv) == 1.0
    assert fp8.float().tolist() == [448.0, -448.0, 0.0, 0.0, 1.0]  # saturated, not NaN
    assert (state.saturated, state.underflowed, state.elements) == (2, 1, 5)


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_linear_forward_and_backward_match_fp32_within_fp8_error(fmt, recipe):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 64, requires_grad=True)
    w = (torch.randn(96, 64) * 0.05).requires_grad_()
    b = torch.randn(96, requires_grad=True)
    grad = torch.randn(4, 16, 96)
    meta = FP8Meta(FP8Recipe(format=fmt, recipe=recipe))
    if recipe == "delayed":  # one step to learn the amaxes, as training does
        fp8_linear(x, w, meta, b).backward(grad)
        meta.step()
        x.grad = w.grad = b.grad = None
    y = fp8_linear(x, w, meta, b)
    y.backward(grad)
    ours = (y.detach(), x.grad, w.grad, b.grad)
    x.grad = w.grad = b.grad = None
    ref_y = torch.nn.functional.linear(x, w, b)
    ref_y.backward(grad)
    refs = (ref_y.detach(), x.grad, w.grad, b.grad)
    grad_bound = E5M2_BOUND if fmt == "hybrid" else E4M3_BOUND

    def rel(a, r):
        return float((a - r).norm() / r.norm())
    assert rel(ours[0], refs[0]) < E4M3_BOUND
    assert rel(ours[1], refs[1]) < grad_bound
    assert rel(ours[2], refs[2]) < grad_bound
    assert torch.equal(ours[3], refs[3])  # the bias gradient does not go through FP8
    assert ours[1].shape == x.shape and ours[2].dtype == w.dtype


def test_delayed_first_step_saturates_then_adapts():
    """At scale 1 values above 448 saturate; after one step the scale comes from the amax."""
    meta = FP8Meta(FP8Recipe(recipe="delayed"))
    meta.set_counting(True)
    x = torch.full((2, 8), 1000.0)
    w = torch.eye(8)
    assert float(fp8_linear(x, w, meta).max()) == 448.0
    meta.step()
    meta.reset_counts()
    assert float(fp8_linear(x, w, meta).max()) == pytest.approx(1000.0, rel=2 ** -4)
    assert meta.counts()["input"] == (0, 0, 16)


def _column_parallel_fp8(recipe_name):
    """Each of 2 ranks holds half the weight's rows (a column-parallel layer) and half the
    batch's rows of the input gradient; amaxes are maxed over the group."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    w = torch.randn(16, 32)
    meta = FP8Meta(FP8Recipe(recipe=recipe_name), amax_group=dist.group.WORLD)
    w_shard = w.chunk(2)[rank].clone()
    if recipe_name == "delayed":
        fp8_linear(x, w_shard, meta)
        meta.step()
    return fp8_linear(x, w_shard, meta)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_tensor_parallel_shards_scale_like_one_process(recipe):
    from tests.helpers import run_distributed
    shards = run_distributed(_column_parallel_fp8, 2, recipe)
    torch.manual_seed(0)
    x, w = torch.randn(8, 32), torch.randn(16, 32)
    meta = FP8Meta(FP8Recipe(recipe=recipe))
    if recipe == "delayed":
        fp8_linear(x, w, meta)
        meta.step()
    whole = fp8_linear(x, w, meta)
    # the same scales give the same FP8 operands, so the products differ only by the fp32
    # accumulation order of a narrower GEMM (~1e-7); without the amax reduction each rank's
    # scale differs and so does the rounding (~1e-2)
    torch.testing.assert_close(torch.cat(shards, dim=1), whole, rtol=1e-6, atol=1e-5)


def _delayed_step_over_data_parallel_ranks():
    """Each rank saw other micro-batches: step(group) gives every rank the scale of the
    largest amax any of them saw."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    state = ScalingState(FP8Recipe(recipe="delayed"), "input")
    state.scale_for(torch.tensor([2.0 + 4.0 * dist.get_rank()]))  # amax 2 and 6
    state.step(dist.group.WORLD)
    return float(state.scale)


def test_delayed_scales_agree_across_data_parallel_ranks():
    from tests.helpers import run_distributed
    assert run_distributed(_delayed_step_over_data_parallel_ranks, 2) == \
        [pytest.approx(448.0 / 6.0)] * 2


def test_evaluation_does_not_feed_the_history():
    meta = FP8Meta(FP8Recipe(recipe="delayed"))
    fp8_linear(torch.full((2, 4), 100.0), torch.eye(4), meta, record=False)
    meta.step()
    assert float(meta.states["input"].scale) == 1.0  # nothing recorded: the scale stays
