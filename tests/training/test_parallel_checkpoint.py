"""Checkpoints under tensor + data parallelism with the distributed optimizer: one folder per
tensor rank, whole per-parameter optimizer state, exact resume at the same layout (other
layouts: test_checkpoint_relayout.py)."""

import os

import torch

from tests.helpers import TINY_MODEL, lm_losses, run_distributed, run_pretrain

# Dropout on: the per-rank RNG streams (the tensor-parallel tracker included) must resume too.
RUN = TINY_MODEL + ["--train-iters", "8", "--tensor-model-parallel-size", "2",
                    "--sequence-parallel", "--use-distributed-optimizer", "--norm-placement",
                    "peri", "--micro-batch-size", "2", "--lr-decay-style", "cosine"]


def _runs(ckpt):
    out = {}
    out["straight"] = run_pretrain(RUN)
    out["first"] = run_pretrain(RUN + ["--save", ckpt, "--exit-interval", "4"])
    out["resumed"] = run_pretrain(RUN + ["--load", ckpt])
    return {name: (code, lines) for name, (code, lines) in out.items()}


def test_resume_and_layout(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    results = run_distributed(_runs, 4, ckpt)
    last = results[-1]
    assert all(last[name][0] == 0 for name in ("straight", "first", "resumed"))
    straight, resumed = lm_losses(last["straight"][1]), lm_losses(last["resumed"][1])
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == {i: straight[i] for i in resumed}  # to the last printed digit
    assert sorted(os.listdir(os.path.join(ckpt, "iter_0000004"))) == ["mp_rank_00", "mp_rank_01"]
    state = torch.load(os.path.join(ckpt, "iter_0000004", "mp_rank_01", "model_optim_rng.pt"),
                       weights_only=True)
    assert state["optimizer"]["distributed"] and state["args"]["tensor_model_parallel_size"] == 2
    # the whole optimizer state of this tensor rank (gathered over data-parallel ranks):
    # per-parameter tensors of full shard size, by parameter name
    qkv = state["model"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    saved = state["optimizer"]["param_state"]["model"][
        "decoder.layers.0.self_attention.linear_qkv.weight"]
    assert saved["exp_avg"].shape == qkv.shape and saved["exp_avg_sq"].abs().sum() > 0
