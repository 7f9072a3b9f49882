"""The CUDA path: bf16 training, exact resume with the CUDA RNG state, fused AdamW, SDPA's
flash kernel, FP8 through torch._scaled_mm on Hopper, TransformerEngine layers, the
context-parallel attention kernel. Every test
skips with a reason on a machine without CUDA (or without transformer_engine); they run in
tests/gpu/run_checks.sh on the GPU machine, before tools/gpu_checks.py."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, TINY_MODEL, lm_losses, run_pretrain

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# true only on a CUDA machine, so that without CUDA every test gives the one reason above
needs_te = pytest.mark.skipif(
    torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is None,
    reason="needs transformer_engine (pip install -e .[te])")
needs_hopper = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
    reason="FP8 GEMMs (torch._scaled_mm) need compute capability 8.9 or newer")

RUN = TINY_MODEL + ["--train-iters", "20", "--lr-warmup-iters", "2"]


def _losses(argv):
    code, lines = run_pretrain(argv)
    assert code == 0, lines[-5:]
    return [float(v) for _, v in sorted(lm_losses(lines).items())]


@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_bf16_loss_falls_on_cuda(placement):
    torch.cuda.reset_peak_memory_stats()
    code, lines = run_pretrain(RUN + ["--bf16", "--norm-placement", placement])
    assert code == 0, lines[-5:]
    losses = [float(v) for _, v in sorted(lm_losses(lines).items())]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]
    # Megatron-LM's memory line after the first log line, and CUDA's allocator statistics
    # in what --log-memory-to-tensorboard writes
    memory = [x for x in lines if "(after 1 iterations) memory (MB) | allocated:" in x]
    assert len(memory) == 1 and "max reserved:" in memory[0], lines[:20]
    from megatron.training.log_writers import memory_stats
    stats = memory_stats()
    assert "mem-allocated-count" in stats and stats["mem-max-allocated-bytes"] > 0


def _pretrain_process(argv):
    """pretrain_gpt.py in a fresh process, as a resumed job starts (CUDA not yet initialized
    when the RNG states are seeded and restored); returns its printed lines."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *argv],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout.splitlines()


def test_resume_on_cuda_continues_the_loss_curve(tmp_path):
    """Dropout on, so the CUDA RNG state must be saved and restored with the weights.
    Iterations 6..10 after stopping at 5 match the uninterrupted run to 1e-5 relative: CUDA
    kernels with atomic adds (the embedding's backward) may reorder fp32 sums between runs,
    which is ulps per step; a lost RNG state changes every dropout mask, which is percent."""
    run = TINY_MODEL + ["--train-iters", "10", "--hidden-dropout", "0.1",
                        "--attention-dropout", "0.1", "--lr-warmup-iters", "2"]
    straight = _pretrain_process(run)
    ckpt = str(tmp_path / "ckpt")
    first = _pretrain_process(run + ["--save", ckpt, "--load", ckpt, "--exit-interval", "5"])
    assert any("exiting program at iteration 5" in line for line in first)
    state = torch.load(os.path.join(ckpt, "iter_0000005", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=True, map_location="cpu")
    assert state["rng_state"][0]["cuda_rng_state"] is not None
    resumed = _pretrain_process(run + ["--save", ckpt, "--load", ckpt])
    expected, got = lm_losses(straight), lm_losses(resumed)
    assert sorted(got) == list(range(6, 11))
    for i in got:
        assert float(got[i]) == pytest.approx(float(expected[i]), rel=1e-5), i


def _tiny_gpt(**overrides):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import set_random_seed
    from megatron.core.transformer import TransformerConfig
    set_random_seed(0)
    config = TransformerConfig(num_layers=2, hidden_size=128, num_attention_heads=2,
                               max_position_embeddings=128, hidden_dropout=0.0,
                               attention_dropout=0.0, **overrides)
    return config, GPTModel(config, 512).cuda()


def test_fused_adamw_on_cuda():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    for precision in ({}, {"bf16": True}):
        _, model = _tiny_gpt(params_dtype=torch.bfloat16 if precision else torch.float32)
        model = DistributedDataParallel(DistributedDataParallelConfig(), model)
        opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, **precision), [model])
        assert opt.optimizer.defaults.get("fused") is True, precision


def test_sdpa_flash_backend_for_bf16_causal_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron.core.transformer.attention import SelfAttention
    config, _ = _tiny_gpt(params_dtype=torch.bfloat16)
    attention = SelfAttention(config, layer_number=1).cuda()
    x = torch.randn(128, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run this call
        y = attention(x)
        y.float().sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@needs_hopper
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_local_training_on_cuda(recipe):
    losses = _losses(RUN + ["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", recipe,
                            "--norm-placement", "peri"])
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]


@needs_te
@pytest.mark.parametrize("fp8", [[], ["--fp8-format", "hybrid"]], ids=["bf16", "fp8"])
def test_transformer_engine_training_on_cuda(fp8):
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("TransformerEngine FP8 needs compute capability 8.9 or newer")
    losses = _losses(RUN + ["--bf16", "--transformer-impl", "transformer_engine", *fp8])
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_context_parallel_kernel_on_cuda(dtype, tolerance):
    """context_parallel.attention's kernel (one rank: no communication) on CUDA against SDPA
    in fp32: output and q, k, v gradients, with document masks (bf16: its rounding)."""
    from tests.core.transformer.test_context_parallel import kernel_against_sdpa
    assert max(kernel_against_sdpa("cuda", dtype)) < tolerance
