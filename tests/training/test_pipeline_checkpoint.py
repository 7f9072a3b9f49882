"""Checkpoints under pipeline parallelism: mp_rank_TT_PPP folders, tied embedding copies kept
equal, exact resume with the interleaved schedule."""

import os

import torch

from tests.helpers import TINY_MODEL, lm_losses, run_distributed, run_pretrain

# Dropout on: every stage's RNG streams must resume too.
RUN = TINY_MODEL + ["--num-layers", "4", "--train-iters", "6", "--micro-batch-size", "2",
                    "--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                    "--num-layers-per-virtual-pipeline-stage", "1", "--norm-placement", "peri"]


def _runs(root):
    return {"straight": run_pretrain(RUN + ["--save", f"{root}/every", "--save-interval", "1"]),
            "first": run_pretrain(RUN + ["--save", f"{root}/ckpt", "--exit-interval", "3"]),
            "resumed": run_pretrain(RUN + ["--load", f"{root}/ckpt"])}


def test_pipeline_checkpoints(tmp_path):
    last = run_distributed(_runs, 4, str(tmp_path))[-1]
    assert all(code == 0 for code, _ in last.values())
    straight, resumed = lm_losses(last["straight"][1]), lm_losses(last["resumed"][1])
    assert resumed == {i: straight[i] for i in (4, 5, 6)}  # to the last printed digit
    folder = tmp_path / "ckpt" / "iter_0000003"
    assert sorted(os.listdir(folder)) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                                          "mp_rank_01_001"]
    for it in (1, 2, 3, 6):
        for tp in ("00", "01"):
            load = lambda pp: torch.load(  # noqa: E731
                tmp_path / "every" / f"iter_{it:07d}" / f"mp_rank_{tp}_{pp}" /
                "model_optim_rng.pt", weights_only=True)
            first, second = load("000"), load("001")
            # virtual chunks: model0 (layer 1 / 2) and model1 (layer 3 / 4) on each stage
            assert sorted(k for k in first if k.startswith("model")) == ["model0", "model1"]
            embedding = first["model0"]["embedding.word_embeddings.weight"]
            copy = second["model1"]["output_layer.weight"]
            assert torch.equal(embedding, copy), f"tied copies differ after iteration {it}"
