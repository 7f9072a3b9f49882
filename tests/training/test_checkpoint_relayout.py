"""A checkpoint saved at one parallel layout continues at another, at load time: weights,
optimizer state, schedule and data position carry over, so the loss curve of a run whose
layout changes every two iterations is the one-process curve."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, TINY_MODEL, lm_losses, run_distributed, run_pretrain

# Dropout off: tensor-parallel layouts draw different masks, so only then is one curve
# comparable with another. Peri-LN with RMSNorm, SwiGLU (fc1 split with stride 2), RoPE and
# grouped-query attention exercises every way a tensor is split.
RUN = TINY_MODEL + ["--num-layers", "4", "--num-attention-heads", "8",
                    "--group-query-attention", "--num-query-groups", "4",
                    "--norm-placement", "peri", "--normalization", "RMSNorm", "--swiglu",
                    "--position-embedding-type", "rope", "--train-iters", "12",
                    "--hidden-dropout", "0", "--attention-dropout", "0",
                    "--micro-batch-size", "2", "--global-batch-size", "8",
                    "--lr-warmup-iters", "2", "--lr-decay-style", "cosine"]

# Each entry trains two iterations from the previous one's checkpoint, on 4 processes.
CHAIN = [
    ("TP2xPP2 virtual", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                         "2", "--num-layers-per-virtual-pipeline-stage", "1",
                         "--sequence-parallel"]),
    ("TP1xDP4", []),
    ("TP4", ["--tensor-model-parallel-size", "4"]),
    ("PP2 virtual xDP2 distributed", ["--pipeline-model-parallel-size", "2",
                                      "--num-layers-per-virtual-pipeline-stage", "1",
                                      "--use-distributed-optimizer"]),
    ("PP4", ["--pipeline-model-parallel-size", "4"]),
]
# ... then tools/checkpoint/convert.py re-lays the checkpoint out offline for the last one.
OFFLINE = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
           "--target-decoder-first-pipeline-num-layers", "1"]
LAST = ("PP2 uneven xTP2 (converted offline)",
        ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
         "--tensor-model-parallel-size", "2"])


def _chain(ckpt, chain):
    out = []
    for name, flags in chain:
        code, lines = run_pretrain(RUN + flags + ["--save", ckpt, "--load", ckpt,
                                                  "--exit-interval", "2"])
        out.append((name, code, lines))
    return out


def test_layout_changes_continue_the_one_process_curve(tmp_path):
    code, lines = run_pretrain(RUN)
    assert code == 0
    straight = {i: float(v) for i, v in lm_losses(lines).items()}
    ckpt, converted = str(tmp_path / "ckpt"), str(tmp_path / "converted")
    results = run_distributed(_chain, 4, ckpt, CHAIN)
    convert = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "checkpoint", "convert.py"),
         "--model-type", "GPT", "--loader", "megatron", "--saver", "megatron",
         "--load-dir", ckpt, "--save-dir", converted, *OFFLINE],
        capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr[-2000:]
    last = run_distributed(_chain, 4, converted, [LAST])
    results = [a + b for a, b in zip(results, last)]
    # the loss is printed by the last rank; the load notes by rank 0
    for step, (name, code, lines) in enumerate(results[-1]):
        assert code == 0, (name, lines[-5:])
        losses = lm_losses(lines)
        assert sorted(losses) == [2 * step + 1, 2 * step + 2], (name, losses)
        for i, value in losses.items():
            # 1e-4 relative: fp32 sums split over ranks round differently, and 12 Adam steps
            # let those ulps grow to ~1e-6; a lost moment or learning-rate step shows at 1e-2
            assert float(value) == pytest.approx(straight[i], rel=1e-4), (name, i)
    for step, (name, code, lines) in enumerate(results[0][1:], start=1):
        where = converted if step == len(CHAIN) else ckpt
        assert any(f"loaded checkpoint from {where}/iter_{2 * step:07d} at iteration "
                   f"{2 * step}" in line for line in lines), (name, lines)
    state = torch.load(os.path.join(converted, "iter_0000012", "mp_rank_01_001",
                                    "model_optim_rng.pt"), weights_only=True)
    per_param = state["optimizer"]["param_state"]["model"]
    fc1 = state["model"]["decoder.layers.2.mlp.linear_fc1.weight"]
    assert per_param["decoder.layers.2.mlp.linear_fc1.weight"]["exp_avg"].shape == fc1.shape


BF16 = TINY_MODEL + ["--train-iters", "4", "--bf16", "--hidden-dropout", "0",
                     "--attention-dropout", "0", "--micro-batch-size", "2"]


def _bf16_runs(ckpt):
    flags = BF16 + ["--use-distributed-optimizer"]
    return [run_pretrain(flags), run_pretrain(flags + ["--save", ckpt, "--exit-interval", "2"]),
            run_pretrain(flags + ["--load", ckpt])]


def test_bf16_master_weights_carry_over(tmp_path):
    """The fp32 master copies are saved with the optimizer: an exact resume at DP2 with the
    distributed optimizer, and at DP1 without it the same curve to bf16 rounding."""
    ckpt = str(tmp_path / "ckpt")
    straight, first, resumed = [lm_losses(lines) for _, lines in
                                run_distributed(_bf16_runs, 2, ckpt)[-1]]
    assert resumed == {i: straight[i] for i in (3, 4)}
    code, lines = run_pretrain(BF16 + ["--load", ckpt])
    assert code == 0
    for i, value in lm_losses(lines).items():
        # the one-process run sums bf16 gradients in another order than DP2: ~1e-5 apart
        assert float(value) == pytest.approx(float(straight[i]), rel=1e-4)
    state = torch.load(os.path.join(ckpt, "iter_0000002", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=True)
    entry = state["optimizer"]["param_state"]["model"]["embedding.word_embeddings.weight"]
    assert entry["fp32_param"].dtype == torch.float32
    assert state["model"]["embedding.word_embeddings.weight"].dtype == torch.bfloat16
