"""Layer statistics are the same under every parallel layout, and a skipped update changes
nothing under every layout.

Each spawned group (world size 2, then 4) runs every layout in turn, twice: once recording
layer statistics, once with a NaN injected at iteration 3 and a checkpoint after each step."""

import json
import os

import pytest
import torch

from tests.helpers import TINY_MODEL, run_distributed, run_pretrain
from tests.training import test_layer_stats as single

RUN = TINY_MODEL + ["--hidden-dropout", "0", "--attention-dropout", "0", "--num-layers", "4",
                    "--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size", "8",
                    "--lr-warmup-iters", "1"]
PLACEMENTS = {"peri": ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
                       "--embedding-norm", "--position-embedding-type", "rope",
                       "--qk-layernorm"],
              "mix": ["--untie-embeddings-and-output-weights", "--mix-ln-alpha", "0.5"]}
STATS = ["--log-layer-stats", "--layer-stats-interval", "2"]
LAYOUTS = {
    2: {"TP=2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        "PP=2 interleaved": ["--pipeline-model-parallel-size", "2",
                             "--num-layers-per-virtual-pipeline-stage", "1"],
        "DP=2 distributed optimizer": ["--use-distributed-optimizer",
                                       "--overlap-grad-reduce", "--overlap-param-gather"]},
    4: {"TP=2xPP=2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                         "--pipeline-model-parallel-size", "2"],
        "TP=2xDP=2": ["--tensor-model-parallel-size", "2"]},
}


def run_layouts(base, layouts):
    """In each spawned rank: every layout and placement with statistics, then with a NaN at
    iteration 3; returns {(layout, placement): (exit codes, stats lines)} from the last rank."""
    out = {}
    rank = int(os.environ["RANK"])
    for name, flags in layouts.items():
        for placement, extra in PLACEMENTS.items():
            folder = os.path.join(base, f"{name}-{placement}".replace(" ", "_").replace("=", ""))
            path = os.path.join(folder, "stats.jsonl")
            code, _ = run_pretrain(RUN + extra + flags + STATS + [
                "--norm-placement", placement, "--layer-stats-file", path])
            single._DISTURB.update({3: float("nan")})
            try:
                nan_code, _ = run_pretrain(
                    RUN + extra + flags + ["--norm-placement", placement, "--save",
                                           os.path.join(folder, "ckpt"), "--save-interval", "2",
                                           "--exit-interval", "3"],
                    forward_step=single.disturbing_forward_step)
            finally:
                single._DISTURB.clear()
            steps = None
            if rank == int(os.environ["WORLD_SIZE"]) - 1:
                steps = [r for r in single.read(path) if r["type"] == "layer_stats"]
            out[(name, placement)] = (code, nan_code, steps)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    base = tmp_path_factory.mktemp("one")
    out = {}
    for placement, extra in PLACEMENTS.items():
        path = base / f"{placement}.jsonl"
        code, lines = run_pretrain(RUN + extra + STATS + ["--norm-placement", placement,
                                                          "--layer-stats-file", str(path)])
        assert code == 0, lines[-3:]
        out[placement] = [r for r in single.read(path) if r["type"] == "layer_stats"]
    return out


def assert_close(ours, reference, where):
    """fp32 sums split over ranks round differently and 1-3 Adam steps carry that into the
    weights (~1e-6 relative); 1e-4 leaves room for nothing else. A mean near zero is compared
    against the tensor's RMS instead of itself."""
    if isinstance(reference, dict):
        assert set(ours) == set(reference), where
        for key in reference:
            assert_close(ours[key], reference[key], where + (key,))
    elif isinstance(reference, list):
        assert len(ours) == len(reference), where
        for i, (a, b) in enumerate(zip(ours, reference)):
            assert_close(a, b, where + (i,))
    elif isinstance(reference, float):
        assert ours == pytest.approx(reference, rel=1e-4, abs=1e-7), where
    else:
        assert ours == reference, where


def _checkpoints(folder, iteration):
    """{file name: contents} of one saved iteration (every tensor/pipeline rank's file)."""
    root = os.path.join(folder, "ckpt", f"iter_{iteration:07d}")
    return {d: torch.load(os.path.join(root, d, "model_optim_rng.pt"), weights_only=True)
            for d in sorted(os.listdir(root))}


@pytest.mark.parametrize("world_size", [2, 4])
def test_layer_stats_and_skipped_updates_under_every_layout(one_process, world_size,
                                                            tmp_path):
    results = run_distributed(run_layouts, world_size, str(tmp_path), LAYOUTS[world_size])
    for (layout, placement), (code, nan_code, steps) in results[-1].items():
        assert code == 0, (layout, placement)
        reference = one_process[placement]
        assert [s["iteration"] for s in steps] == [2, 4]
        assert_close(steps, reference, (layout, placement))
        assert nan_code == 0  # one NaN step: under --max-nan-iterations (10)
        folder = os.path.join(str(tmp_path),
                              f"{layout}-{placement}".replace(" ", "_").replace("=", ""))
        before, after = _checkpoints(folder, 2), _checkpoints(folder, 3)
        assert set(before) == set(after) and len(before) >= 1
        for name in before:
            single.assert_unchanged(before[name], after[name])
    print(json.dumps({k[0]: "ok" for k in results[-1]}))
