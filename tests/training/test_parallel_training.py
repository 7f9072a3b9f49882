"""Training with tensor, sequence and data parallelism prints the loss curve of one process.

Each spawned group (world size 2, then 4) trains every placement under every layout in turn,
so process start-up is paid twice for the whole module."""

import os
import subprocess
import sys

import pytest

from tests.helpers import (
    REPO,
    TINY_MODEL,
    assert_same_curves,
    lm_losses,
    one_process_curves,
    run_distributed,
    train_layouts,
)

RUN = TINY_MODEL + ["--train-iters", "20", "--hidden-dropout", "0", "--attention-dropout", "0",
                    "--num-attention-heads", "8", "--group-query-attention",
                    "--num-query-groups", "4", "--global-batch-size", "8",
                    "--micro-batch-size", "2", "--seq-length", "32", "--lr-warmup-iters", "2"]
PLACEMENTS = {"pre": [], "post": ["--position-embedding-type", "rope"],
              "peri": ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
                       "--embedding-norm", "--position-embedding-type", "rope"],
              "mix": ["--untie-embeddings-and-output-weights", "--swiglu"]}
ALL = tuple(PLACEMENTS)
LAYOUTS = {
    2: {"TP=2+SP": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], ALL),
        "DP=2": ([], ALL),
        "DP=2 distributed optimizer": (["--use-distributed-optimizer", "--overlap-grad-reduce",
                                        "--ddp-bucket-size", "20000"], ALL)},
    4: {"TP=2xDP=2": (["--tensor-model-parallel-size", "2"], ALL),
        "TP=2xDP=2+SP distributed optimizer": (
            ["--tensor-model-parallel-size", "2", "--sequence-parallel",
             "--use-distributed-optimizer", "--overlap-grad-reduce"], ALL)},
}


@pytest.fixture(scope="module")
def one_process():
    return one_process_curves(RUN, PLACEMENTS)


@pytest.mark.parametrize("world_size", [2, 4])
def test_loss_curve_matches_one_process(one_process, world_size):
    results = run_distributed(train_layouts, world_size, RUN, PLACEMENTS, LAYOUTS[world_size])
    assert_same_curves(results[-1], one_process, 20)


def test_torchrun_tensor_and_sequence_parallel_prints_the_same_losses():
    run = TINY_MODEL + ["--train-iters", "5", "--hidden-dropout", "0", "--attention-dropout",
                        "0", "--norm-placement", "peri"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    printed = []
    for launcher, extra in (([sys.executable], []),
                            ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                              "2"], ["--tensor-model-parallel-size", "2", "--sequence-parallel"])):
        result = subprocess.run(launcher + [os.path.join(REPO, "pretrain_gpt.py"), *run, *extra],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        printed.append({i: f"{float(v):.4g}" for i, v in lm_losses(result.stdout.splitlines())
                        .items()})
    assert len(printed[0]) == 5 and printed[0] == printed[1]
