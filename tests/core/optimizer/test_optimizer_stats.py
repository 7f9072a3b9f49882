"""--log-num-zeros-in-grad and --log-params-norm from the optimizer (one process; the
multi-rank counts are checked end to end in tests/training/test_logging.py)."""

import math

import pytest
import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from tests.core.optimizer.test_optimizer import tiny_model


@pytest.mark.parametrize("bf16", [False, True])
def test_zeros_counted_in_the_gradients(bf16):
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = DistributedDataParallel(DistributedDataParallelConfig(), tiny_model(dtype=dtype))
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=bf16,
                                                 log_num_zeros_in_grad=True), [model])
    model.zero_grad_buffer()
    model.grad_buffer.fill_(1e-3)
    model.grad_buffer[:37] = 0.0
    model.grad_buffer[-5:] = 0.0
    ok, _ = opt.step()
    assert ok and opt.num_zeros_in_grad == 42
    opt.log_num_zeros_in_grad = False
    opt.step()
    assert opt.num_zeros_in_grad is None


def test_params_norm_is_the_norm_of_all_parameters():
    model = DistributedDataParallel(DistributedDataParallelConfig(), tiny_model())
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3), [model])
    expected = math.sqrt(sum(float(p.detach().double().square().sum()) for p in model.parameters()))
    assert opt.params_norm() == pytest.approx(expected, rel=1e-6)  # fp32 sums of squares
