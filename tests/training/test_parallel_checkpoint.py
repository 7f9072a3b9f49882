"""Checkpoints under tensor + data parallelism with the distributed optimizer: one folder per
tensor rank, exact resume at the same layout, refusal at another tensor-parallel size."""

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
    other = [w if w != "2" or RUN[i - 1] != "--tensor-model-parallel-size" else "4"
             for i, w in enumerate(RUN)]
    out["other tp"] = run_pretrain(other + ["--load", ckpt, "--micro-batch-size", "2",
                                            "--global-batch-size", "2"])
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
    # the whole optimizer state of this tensor rank: per-parameter tensors of full shard size
    qkv = state["model"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    names = list(state["model"])
    assert state["optimizer"]["params"][names.index(
        "decoder.layers.0.self_attention.linear_qkv.weight")]["exp_avg"].shape == qkv.shape
    code, lines = results[0]["other tp"]
    errors = [line for line in lines if "error:" in line]
    assert code == 2 and len(errors) == 1
    assert "--tensor-model-parallel-size is 2 there but 4 here" in errors[0]
