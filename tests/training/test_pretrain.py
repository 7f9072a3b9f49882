"""pretrain_gpt.py end to end: the loss falls, launchers agree, data parallelism matches."""

import math
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY_MODEL, lm_losses, run_distributed, run_pretrain

NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]


@pytest.mark.parametrize("placement", ["pre", "post", "peri", "mix"])
def test_loss_falls(placement):
    """Mock documents count 1, 2, 3, ...: a working model learns it within 40 steps."""
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "40", "--norm-placement",
                                             placement, "--lr-warmup-iters", "4"])
    assert code == 0
    losses = [float(v) for _, v in sorted(lm_losses(lines).items())]
    assert len(losses) == 40
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert start > math.log(500) - 0.5  # starts near uniform over the vocabulary
    assert end < start - 0.5, losses


def test_log_line_format():
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "2", "--eval-iters", "1",
                                             "--eval-interval", "2"])
    line = next(x for x in lines if "iteration        2/       2" in x)
    assert re.fullmatch(
        r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration        2/       2 \| consumed samples:"
        r" +16 \| elapsed time per iteration \(ms\): [\d.]+ \| learning rate: \d\.\d{6}E[+-]\d\d"
        r" \| global batch size:     8 \| lm loss: \d\.\d{6}E\+00 \| loss scale: 1\.0 \|"
        r" grad norm: [\d.]+ \| number of skipped iterations:   0 \|"
        r" number of nan iterations:   0 \|", line)
    assert any(re.fullmatch(r" validation loss at iteration 2 \| lm loss value: \S+ \|"
                            r" lm loss PPL: \S+ \| ", x) for x in lines)


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_half_precision_trains(precision):
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "6", precision,
                                             "--initial-loss-scale", "4096"])
    assert code == 0
    losses = lm_losses(lines)
    assert losses and all(math.isfinite(float(v)) for v in losses.values())


def test_python_and_torchrun_agree():
    run = TINY_MODEL + ["--train-iters", "3", "--norm-placement", "peri"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2")
    outputs = []
    for launcher in ([sys.executable],
                     [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]):
        result = subprocess.run(launcher + [os.path.join(REPO, "pretrain_gpt.py"), *run],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(lm_losses(result.stdout.splitlines()))
    assert len(outputs[0]) == 3 and outputs[0] == outputs[1]


def _pretrain_on_rank(argv):
    code, lines = run_pretrain(argv)
    return code, lm_losses(lines)


def test_data_parallel_matches_one_process():
    """Two data-parallel ranks, each with half of every global batch, print the one-process
    losses (gradients are averaged over ranks exactly as over micro-batches)."""
    run = TINY_MODEL + NO_DROPOUT + ["--train-iters", "5", "--norm-placement", "peri"]
    code, lines = run_pretrain(run)
    one = lm_losses(lines)
    assert code == 0 and len(one) == 5
    results = run_distributed(_pretrain_on_rank, 2, run)
    assert all(code == 0 for code, _ in results)
    last_rank_losses = results[-1][1]
    # the reduction order differs (all-reduce vs accumulation): equal to the printed
    # 7 significant digits except for the last one or two
    for i, value in one.items():
        assert float(last_rank_losses[i]) == pytest.approx(float(value), rel=1e-5)
