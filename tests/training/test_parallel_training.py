"""Training with tensor, sequence and data parallelism prints the loss curve of one process.

Each spawned group (world size 2, then 4) trains every placement under every layout in turn,
so process start-up is paid twice for the whole module."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY_MODEL, lm_losses, run_distributed, run_pretrain

RUN = TINY_MODEL + ["--train-iters", "20", "--hidden-dropout", "0", "--attention-dropout", "0",
                    "--num-attention-heads", "8", "--group-query-attention",
                    "--num-query-groups", "4", "--global-batch-size", "8",
                    "--micro-batch-size", "2", "--seq-length", "32", "--lr-warmup-iters", "2"]
PLACEMENTS = {"pre": [], "post": ["--position-embedding-type", "rope"],
              "peri": ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
                       "--embedding-norm", "--position-embedding-type", "rope"],
              "mix": ["--untie-embeddings-and-output-weights", "--swiglu"]}
LAYOUTS = {
    2: {"TP=2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        "DP=2": [],
        "DP=2 distributed optimizer": ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                       "--ddp-bucket-size", "20000"]},
    4: {"TP=2xDP=2": ["--tensor-model-parallel-size", "2"],
        "TP=2xDP=2+SP distributed optimizer": [
            "--tensor-model-parallel-size", "2", "--sequence-parallel",
            "--use-distributed-optimizer", "--overlap-grad-reduce"]},
}


def _train_every_layout(world_size):
    results = {}
    for placement, extra in PLACEMENTS.items():
        for name, layout in LAYOUTS[world_size].items():
            code, lines = run_pretrain(RUN + extra + ["--norm-placement", placement] + layout)
            results[(placement, name)] = (code, lm_losses(lines))
    return results


@pytest.fixture(scope="module")
def one_process():
    curves = {}
    for placement, extra in PLACEMENTS.items():
        code, lines = run_pretrain(RUN + extra + ["--norm-placement", placement])
        assert code == 0
        curves[placement] = {i: float(v) for i, v in lm_losses(lines).items()}
        assert len(curves[placement]) == 20
    return curves


@pytest.mark.parametrize("world_size", [2, 4])
def test_loss_curve_matches_one_process(one_process, world_size):
    """Every iteration within 1e-4 relative: fp32 sums split over ranks round differently,
    and 20 Adam steps let those ulps grow to ~1e-6; 1e-4 leaves room for nothing else."""
    last_rank = run_distributed(_train_every_layout, world_size, world_size)[-1]
    for (placement, layout), (code, losses) in last_rank.items():
        assert code == 0, (placement, layout)
        assert sorted(losses) == list(range(1, 21)), (placement, layout)
        for i, value in losses.items():
            assert float(value) == pytest.approx(one_process[placement][i], rel=1e-4), \
                (placement, layout, i)


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
