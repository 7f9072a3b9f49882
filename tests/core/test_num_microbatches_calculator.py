"""The micro-batch calculators reproduce Megatron-LM's batch-size ramp, its step schedule
and its update_train_iters."""

import pytest

from megatron.core import ConfigError
from megatron.core.num_microbatches_calculator import (
    build_num_microbatches_calculator,
    get_current_global_batch_size,
    get_num_microbatches,
    init_num_microbatches_calculator,
    parse_step_batch_size_schedule,
    train_iters_for_samples,
    update_num_microbatches,
)


def test_ramp_consumes_samples_as_megatron_does():
    """Megatron-LM's own expectation (tests/unit_tests/test_num_microbatches_calculator.py,
    test_ramp_up): start 16, increment 16, over 96 samples, to 32, micro-batch 8 x DP 2."""
    init_num_microbatches_calculator(0, [16, 16, 96], 32, 8, 2)
    consumed, seen = 0, [0]
    while consumed < 256:
        consumed += get_current_global_batch_size()
        seen.append(consumed)
        update_num_microbatches(consumed)
    assert seen == [0, 16, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256]
    assert get_num_microbatches() == 2


def test_train_iters_for_samples():
    constant = build_num_microbatches_calculator(None, 32, 8, 2)
    assert train_iters_for_samples(constant, 100) == (3, [])  # partial batch dropped
    ramp = build_num_microbatches_calculator([16, 16, 96], 32, 8, 2)
    # ramp iterations while consumed <= 96: 0, 16, 32, 48, 64, 80, 96 -> 7 (to 128 samples)
    assert train_iters_for_samples(ramp, 256) == (7 + 4, [16] * 6 + [32])
    assert train_iters_for_samples(ramp, 40)[0] == 3  # 0, 16, 32 (the last one passes 40)


@pytest.mark.parametrize("ramp,message", [
    ([32, 16, 96], "start batch size 32 is not below global_batch_size=32"),
    ([8, 16, 96], "increment 16 does not divide global_batch_size=32"),
    ([16, 16, 0], "ramp-up samples 0 must be positive"),
])
def test_impossible_ramps_are_config_errors(ramp, message):
    with pytest.raises(ConfigError, match=message):
        build_num_microbatches_calculator(ramp, 32, 8, 2)


def test_gpt3_step_schedule_is_in_tokens():
    """Megatron-LM's GPT-3 script (examples/gpt3/train_gpt3_175b_distributed.sh): "2.4B" is
    2.4e9 tokens, 1171875 samples of 2048; its last step, 12B tokens, is the 5859375 samples
    over which the --rampup-batch-size 16 16 5859375 it replaced ramped."""
    schedule = parse_step_batch_size_schedule(
        "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536", seq_length=2048)
    assert schedule == [(0, 16), (1171875, 320), (2343750, 624), (3515625, 928),
                        (4687500, 1232), (5859375, 1536)]
    assert parse_step_batch_size_schedule("1k:8,0:4", None) == [(0, 4), (1000, 8)]  # samples


def test_step_schedule_drives_the_micro_batches_and_iterations():
    init_num_microbatches_calculator(0, None, None, 2, 2, step_batch_size_schedule="0:4 8:12")
    assert (get_num_microbatches(), get_current_global_batch_size()) == (1, 4)
    update_num_microbatches(8)
    assert (get_num_microbatches(), get_current_global_batch_size()) == (3, 12)
    step = build_num_microbatches_calculator(None, None, 2, 2, "0:4 8:12")
    # 0, 4 (batches of 4), then 8, 20 (batches of 12): the last one passes 30, as in Megatron
    assert train_iters_for_samples(step, 30) == (4, [4, 4, 12, 12])
    with pytest.raises(ConfigError, match="global batch size 6 is not a positive multiple"):
        build_num_microbatches_calculator(None, None, 2, 2, "0:4 8:6").update(8)
