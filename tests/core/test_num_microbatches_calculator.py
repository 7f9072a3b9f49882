"""The micro-batch calculators reproduce Megatron-LM's batch-size ramp and its
update_train_iters."""

import pytest

from megatron.core import ConfigError
from megatron.core.num_microbatches_calculator import (
    build_num_microbatches_calculator,
    get_current_global_batch_size,
    get_num_microbatches,
    init_num_microbatches_calculator,
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
