"""Training counted in samples (--train-samples, --lr-*-samples), Megatron-LM's batch-size
ramp (--rampup-batch-size), --dataloader-type cyclic and --manual-gc."""

import gc
import os
import re
import subprocess
import sys

import pytest

from megatron.core.datasets.samplers import MegatronPretrainingRandomSampler
from megatron.training.arguments import ArgumentError, parse_args, validate_args
from megatron.training.training import cyclic_iter
from tests.helpers import REPO, TINY_MODEL, lm_losses, run_distributed, run_pretrain

NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]
# micro-batch 2 (x data-parallel 1 or 2) divides every size of the ramp 4, 8, 12, 16
START, INCREMENT, RAMP_SAMPLES, FINAL, TRAIN_SAMPLES = 4, 4, 40, 16, 100
RAMP = NO_DROPOUT + ["--micro-batch-size", "2", "--global-batch-size", str(FINAL),
                     "--train-samples", str(TRAIN_SAMPLES), "--rampup-batch-size", str(START),
                     str(INCREMENT), str(RAMP_SAMPLES)]


def logged(lines, field):
    """{iteration: value of ``field`` in that iteration's log line}."""
    found = {}
    for line in lines:
        m = re.search(r"iteration\s+(\d+)/\s*\d+ \|(?:.*\|)? " + field + r": +(\S+) \|",
                      line)
        if m:
            found[int(m.group(1))] = m.group(2)
    return found


def megatron_ramp():
    """The global batch size of every iteration, written out from Megatron-LM's formulas
    (RampupBatchsizeNumMicroBatchesCalculator.update and update_train_iters)."""
    per_increment = RAMP_SAMPLES / ((FINAL - START) / INCREMENT)

    def size_at(consumed):
        return FINAL if consumed > RAMP_SAMPLES else \
            START + int(consumed / per_increment) * INCREMENT
    sizes, consumed = [], 0
    while consumed <= RAMP_SAMPLES and consumed <= TRAIN_SAMPLES:
        sizes.append(size_at(consumed))
        consumed += sizes[-1]
    return sizes + [FINAL] * ((TRAIN_SAMPLES - consumed) // FINAL)


@pytest.fixture(scope="module")
def ramp_run():
    code, lines = run_pretrain(TINY_MODEL + RAMP)
    assert code == 0, lines[-3:]
    return lines


def test_train_samples_sets_the_iterations():
    """44 samples in batches of 8: Megatron trains 44 // 8 = 5 iterations (the partial last
    batch is dropped)."""
    code, lines = run_pretrain(TINY_MODEL + ["--train-samples", "44"])
    assert code == 0
    assert sorted(lm_losses(lines)) == [1, 2, 3, 4, 5]
    assert any(" iteration        5/       5 |" in line for line in lines)


def test_schedule_in_samples_equals_schedule_in_iterations():
    """With a constant batch of 8, N iterations and 8N samples are the same schedule (warm-up,
    then WSD's plateau and annealing): every iteration prints the same learning rate and the
    same loss."""
    common = TINY_MODEL + ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
                           "--min-lr", "1e-4"]
    code, iters = run_pretrain(common + ["--train-iters", "6", "--lr-warmup-iters", "2",
                                         "--lr-decay-iters", "5", "--lr-wsd-decay-iters", "2"])
    assert code == 0
    code, samples = run_pretrain(common + ["--train-samples", "48", "--lr-warmup-samples", "16",
                                           "--lr-decay-samples", "40",
                                           "--lr-wsd-decay-samples", "16"])
    assert code == 0
    lrs = logged(iters, "learning rate")
    assert len(lrs) == 6 and len(set(lrs.values())) == 4  # warm-up, peak, annealing, min-lr
    assert logged(samples, "learning rate") == lrs
    assert lm_losses(samples) == lm_losses(iters)


def test_ramp_follows_megatron_formula(ramp_run):
    """Per iteration: the printed global batch size is Megatron's, consumed samples advance
    by it, the run stops where update_train_iters says, and the linear decay is counted in
    the samples actually consumed."""
    sizes = megatron_ramp()
    assert sizes[:8] == [4, 4, 4, 4, 8, 8, 12, 16]  # the formula in numbers, for the reader
    printed = logged(ramp_run, "global batch size")
    assert sorted(printed) == list(range(1, len(sizes) + 1))
    assert [int(printed[i]) for i in sorted(printed)] == sizes
    consumed = logged(ramp_run, "consumed samples")
    lrs = logged(ramp_run, "learning rate")
    for i in printed:
        assert int(consumed[i]) == sum(sizes[:i])
        # default linear decay from 3e-3 to 0 over --train-samples, no warm-up
        assert float(lrs[i]) == pytest.approx(3e-3 * (1 - sum(sizes[:i]) / TRAIN_SAMPLES),
                                              rel=1e-6)


def test_resume_mid_ramp_continues_the_losses(ramp_run, tmp_path):
    """Stopped after iteration 5 (batch size 8, before the ramp reaches 12 and 16) and
    resumed: every later loss equals the uninterrupted run's to the printed digit."""
    ckpt = str(tmp_path / "ckpt")
    code, first = run_pretrain(TINY_MODEL + RAMP + ["--save", ckpt, "--exit-interval", "5"])
    assert code == 0 and sorted(lm_losses(first)) == [1, 2, 3, 4, 5]
    code, resumed = run_pretrain(TINY_MODEL + RAMP + ["--load", ckpt])
    assert code == 0
    whole = lm_losses(ramp_run)
    assert lm_losses(first) == {i: whole[i] for i in range(1, 6)}
    assert lm_losses(resumed) == {i: whole[i] for i in range(6, len(whole) + 1)}
    assert logged(resumed, "global batch size") == \
        {i: v for i, v in logged(ramp_run, "global batch size").items() if i > 5}


def _pretrain_on_rank(argv):
    code, lines = run_pretrain(argv)
    return code, lm_losses(lines), logged(lines, "global batch size")


def test_data_parallel_ramp_matches_one_process(ramp_run):
    """Two data-parallel ranks split every micro-batch of the ramp: same batch sizes, and the
    losses of one process up to fp32 reduction order (1e-4, as in test_pretrain)."""
    results = run_distributed(_pretrain_on_rank, 2, TINY_MODEL + RAMP)
    assert all(code == 0 for code, _, _ in results)
    _, losses, sizes = results[-1]
    assert sizes == logged(ramp_run, "global batch size")
    one = lm_losses(ramp_run)
    assert sorted(losses) == sorted(one)
    for i, value in losses.items():
        assert float(value) == pytest.approx(float(one[i]), rel=1e-4), i


def test_cyclic_dataloader_is_shuffled_and_deterministic():
    run = TINY_MODEL + ["--train-iters", "3"]
    code, single = run_pretrain(run)
    assert code == 0
    cyclic = [run_pretrain(run + ["--dataloader-type", "cyclic"]) for _ in range(2)]
    assert all(code == 0 for code, _ in cyclic)
    first, second = (lm_losses(lines) for _, lines in cyclic)
    assert len(first) == 3 and first == second
    assert first[1] != lm_losses(single)[1]  # other samples in the very first batch


def test_random_sampler_epochs_and_resume():
    """Megatron's random sampler: a permutation per epoch (seeded by the epoch), each
    data-parallel rank shuffling its own bucket; resuming at consumed samples continues the
    same order; running out starts the next epoch with another order."""
    def batches(consumed, rank, sharding=True):
        return list(MegatronPretrainingRandomSampler(20, consumed, 2, rank, 2, sharding))
    epoch = batches(0, 0)
    ids = [i for batch in epoch for i in batch]
    assert sorted(ids) == list(range(10)) and ids != list(range(10))  # rank 0's bucket
    assert sorted(i for batch in batches(0, 1) for i in batch) == list(range(10, 20))
    assert batches(8, 0) == epoch[2:]  # 8 consumed = 2 global micro-batches of 2 x 2
    both = sorted(i for r in (0, 1) for batch in batches(0, r, False) for i in batch)
    assert both == list(range(20))
    sampler = MegatronPretrainingRandomSampler(20, 0, 2, 0, 2)
    stream = cyclic_iter(sampler)
    two_epochs = [next(stream) for _ in range(10)]
    assert two_epochs[:5] == epoch and two_epochs[5:] != epoch
    assert sorted(i for batch in two_epochs[5:] for i in batch) == list(range(10))


def test_manual_gc_collects_on_schedule(monkeypatch):
    """--manual-gc: the collector is off during training; one collection at the start, one
    every --manual-gc-interval iterations, a full one before and a young-generation one
    after each evaluation; the collector is on again afterwards."""
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(
        (generation, gc.isenabled())) or real_collect(generation))
    code, lines = run_pretrain(TINY_MODEL + [
        "--train-iters", "4", "--manual-gc", "--manual-gc-interval", "2",
        "--eval-interval", "3", "--eval-iters", "1"])
    assert code == 0 and len(lm_losses(lines)) == 4
    # start; iteration 2; before and after the evaluation at 3; iteration 4
    assert calls == [(2, False), (2, False), (2, False), (0, False), (2, False)]
    assert gc.isenabled()


def validate(*extra, world_size=1):
    return validate_args(parse_args(TINY_MODEL + list(extra)), world_size)


@pytest.mark.parametrize("extra,message", [
    (["--train-iters", "4", "--train-samples", "32"],
     "--train-iters and --train-samples were both given"),
    ([], "--train-iters (or --train-samples) is required"),
    (["--train-samples", "32", "--lr-decay-iters", "3"],
     "--lr-decay-iters 3 was given with --train-samples; a run counted in samples counts its "
     "learning-rate schedule in samples too, so use --lr-decay-samples"),
    (["--train-samples", "32", "--lr-warmup-iters", "1"], "use --lr-warmup-samples"),
    (["--train-iters", "4", "--lr-decay-samples", "24"], "use --lr-decay-iters"),
    (["--train-iters", "4", "--lr-warmup-samples", "8"], "use --lr-warmup-iters"),
    (["--train-samples", "32", "--lr-warmup-fraction", "0.1", "--lr-warmup-samples", "8"],
     "--lr-warmup-fraction and --lr-warmup-samples were both given"),
    (["--train-samples", "32", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2"],
     "--lr-decay-style WSD needs --lr-wsd-decay-samples"),
    (["--train-iters", "4", "--rampup-batch-size", "4", "4", "16"],
     "--rampup-batch-size needs --train-samples instead of --train-iters"),
    (["--train-samples", "64", "--rampup-batch-size", "2", "2", "16"],
     "--rampup-batch-size 2 2 16 reaches a global batch size of 2, which is not a multiple "
     "of --micro-batch-size 4 x data-parallel size 1 = 4"),
    (["--train-samples", "64", "--rampup-batch-size", "8", "4", "16"],
     "--rampup-batch-size start batch size 8 is not below --global-batch-size 8"),
    (["--train-samples", "64", "--global-batch-size", "16", "--rampup-batch-size", "4", "8",
      "16"], "--rampup-batch-size increment 8 does not divide --global-batch-size 16"),
    (["--train-samples", "4"], "--train-samples 4 is less than one global batch"),
    (["--train-iters", "4", "--dataloader-type", "external"],
     "--dataloader-type external expects the script's dataset provider"),
])
def test_contradictions_are_refused_with_one_sentence(extra, message):
    with pytest.raises(ArgumentError) as info:
        validate(*extra)
    text = str(info.value)
    assert message in text
    assert "\n" not in text and text.endswith(".")


def test_interleaved_ramp_needs_micro_batches_in_multiples_of_the_pipeline():
    interleaved = ["--num-layers", "4", "--pipeline-model-parallel-size", "2",
                   "--num-layers-per-virtual-pipeline-stage", "1", "--micro-batch-size", "1",
                   "--global-batch-size", "4", "--train-samples", "32"]
    validate(*interleaved, "--rampup-batch-size", "2", "2", "8", world_size=2)
    with pytest.raises(ArgumentError, match=r"--rampup-batch-size 1 1 8 reaches 1 micro-"
                       r"batches per iteration \(global batch size 1\), but the interleaved "
                       r"schedule needs a multiple of --pipeline-model-parallel-size 2\."):
        validate(*interleaved, "--rampup-batch-size", "1", "1", "8", world_size=2)


def test_refused_before_any_model_is_built():
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *TINY_MODEL,
           "--train-iters", "4", "--rampup-batch-size", "4", "4", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--rampup-batch-size needs --train-samples" in result.stderr
    assert "building GPT model" not in result.stdout
