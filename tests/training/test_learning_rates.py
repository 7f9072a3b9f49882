"""The learning-rate schedules (steps counted in samples, as Megatron counts them)."""

import math

import pytest
import torch

from megatron.training.learning_rates import OptimizerParamScheduler


def schedule(style, warmup=10, decay=100, wsd=0, wsd_style="exponential"):
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "wd_mult": 0.0}],
                          lr=1.0)
    return OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1.0, min_lr=0.1,
                                   lr_warmup_steps=warmup, lr_decay_steps=decay,
                                   lr_decay_style=style, weight_decay=0.1,
                                   wsd_decay_steps=wsd, lr_wsd_decay_style=wsd_style)


def lr_at(sched, n):
    sched.num_steps = 0
    sched.step(n)
    return sched.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root", "WSD"])
def test_warmup_is_linear_from_init(style):
    s = schedule(style, wsd=20)
    assert lr_at(s, 0) == 0.0
    assert lr_at(s, 5) == pytest.approx(0.5)
    assert lr_at(s, 10) == pytest.approx(1.0)


def test_decay_styles():
    assert lr_at(schedule("constant"), 70) == 1.0
    assert lr_at(schedule("linear"), 55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(schedule("cosine"), 55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(schedule("cosine"), 40) == pytest.approx(
        0.1 + 0.9 * 0.5 * (math.cos(math.pi * 30 / 90) + 1))
    assert lr_at(schedule("inverse-square-root"), 40) == pytest.approx(math.sqrt(10 / 40))
    for style in ("linear", "cosine"):
        assert lr_at(schedule(style), 150) == 0.1


@pytest.mark.parametrize("wsd_style,mid", [("linear", 0.5), ("cosine", 0.5),
                                           ("exponential", 2 * 0.5 ** 0.5 - 1),
                                           ("minus_sqrt", 1 - 0.5 ** 0.5)])
def test_wsd_holds_then_anneals(wsd_style, mid):
    s = schedule("WSD", wsd=20, wsd_style=wsd_style)
    assert lr_at(s, 80) == 1.0
    assert lr_at(s, 90) == pytest.approx(0.1 + 0.9 * mid)
    assert lr_at(s, 100) == pytest.approx(0.1)


def test_weight_decay_follows_group_multiplier():
    s = schedule("constant")
    assert s.optimizer.param_groups[0]["weight_decay"] == 0.0


def test_state_roundtrip():
    s = schedule("cosine")
    s.step(37)
    t = schedule("cosine")
    t.load_state_dict(s.state_dict())
    assert t.num_steps == s.num_steps
    assert t.optimizer.param_groups[0]["lr"] == s.optimizer.param_groups[0]["lr"]
