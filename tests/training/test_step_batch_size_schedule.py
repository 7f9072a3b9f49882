"""Megatron-LM's --step-batch-size-schedule "THRESHOLD:BATCH_SIZE ...": thresholds in tokens,
the global batch size of each iteration, the iterations of --train-samples, resume, refusals."""

import pytest

from megatron.training.arguments import ArgumentError, parse_args, validate_args
from tests.helpers import TINY_MODEL, lm_losses, run_pretrain
from tests.training.test_samples_training import NO_DROPOUT, logged

# TINY_MODEL without its --global-batch-size: Megatron-LM refuses it next to a schedule.
_GBS = TINY_MODEL.index("--global-batch-size")
NO_GBS = TINY_MODEL[:_GBS] + TINY_MODEL[_GBS + 2:]
# --seq-length 32: 256 tokens are 8 samples, 0.768K tokens 24 samples
SCHEDULE, TRAIN_SAMPLES = "0:4 256:8 0.768K:16", 70
STEP = NO_DROPOUT + ["--micro-batch-size", "2", "--train-samples", str(TRAIN_SAMPLES),
                     "--step-batch-size-schedule", SCHEDULE]


def megatron_steps():
    """Every iteration's global batch size from Megatron-LM's StepBatchsize calculator and
    update_train_iters: step until the consumed samples reach --train-samples."""
    sizes, consumed = [], 0
    while consumed < TRAIN_SAMPLES:
        sizes.append(16 if consumed >= 24 else 8 if consumed >= 8 else 4)
        consumed += sizes[-1]
    return sizes


@pytest.fixture(scope="module")
def step_run():
    code, lines = run_pretrain(NO_GBS + STEP)
    assert code == 0, lines[-3:]
    return lines


def test_batch_sizes_follow_the_schedule(step_run):
    """Per iteration: the printed global batch size is the schedule's at the samples consumed
    before it, the last batch passes --train-samples (72 > 70) as in Megatron-LM, and the
    linear decay counts the samples actually consumed (clamped at min-lr 0 past 70)."""
    sizes = megatron_steps()
    assert sizes == [4, 4, 8, 8, 16, 16, 16]  # the schedule in numbers, for the reader
    printed = logged(step_run, "global batch size")
    assert [int(printed[i]) for i in sorted(printed)] == sizes
    consumed, lrs = logged(step_run, "consumed samples"), logged(step_run, "learning rate")
    for i in printed:
        assert int(consumed[i]) == sum(sizes[:i])
        assert float(lrs[i]) == pytest.approx(
            3e-3 * max(0.0, 1 - sum(sizes[:i]) / TRAIN_SAMPLES), rel=1e-6, abs=1e-12)


def test_resume_mid_schedule_continues_the_losses(step_run, tmp_path):
    """Stopped after iteration 3 (batch 8, before the step to 16) and resumed: every later
    loss and batch size equals the uninterrupted run's to the printed digit."""
    ckpt = str(tmp_path / "ckpt")
    code, first = run_pretrain(NO_GBS + STEP + ["--save", ckpt, "--exit-interval", "3"])
    assert code == 0 and sorted(lm_losses(first)) == [1, 2, 3]
    code, resumed = run_pretrain(NO_GBS + STEP + ["--load", ckpt])
    assert code == 0
    whole = lm_losses(step_run)
    assert lm_losses(first) == {i: whole[i] for i in (1, 2, 3)}
    assert lm_losses(resumed) == {i: whole[i] for i in range(4, len(whole) + 1)}
    assert logged(resumed, "global batch size") == \
        {i: v for i, v in logged(step_run, "global batch size").items() if i > 3}


@pytest.mark.parametrize("extra,message", [
    (["--global-batch-size", "8", "--train-samples", "64", "--step-batch-size-schedule", "0:8"],
     "Cannot specify both --step-batch-size-schedule and --global-batch-size"),
    (["--train-iters", "4", "--step-batch-size-schedule", "0:8"],
     "--step-batch-size-schedule needs --train-samples instead of --train-iters"),
    (["--train-samples", "64", "--step-batch-size-schedule", "32:8"],
     '--step-batch-size-schedule "32:8" does not start at threshold 0'),
    (["--train-samples", "64", "--step-batch-size-schedule", "0:8 1x:16"],
     'entry "1x:16" has "1X", which is not a number with an optional K, M, B or T suffix'),
    (["--train-samples", "64", "--step-batch-size-schedule", "0:8 64"],
     'entry "64" is not THRESHOLD:BATCH_SIZE'),
    (["--train-samples", "64", "--step-batch-size-schedule", "0:8 64:0"],
     "needs a threshold >= 0 and a positive global batch size"),
    (["--train-samples", "64", "--step-batch-size-schedule", "0:8 16:16"],
     "has two thresholds at sample 0 (tokens are floored to whole samples of --seq-length 32)"),
    (["--train-samples", "64", "--step-batch-size-schedule", "0:8 256:6"],
     '--step-batch-size-schedule "0:8 256:6" reaches a global batch size of 6, which is not a '
     "multiple of --micro-batch-size 4 x data-parallel size 1 = 4"),
    (["--train-samples", "64", "--step-batch-size-schedule", "0:8",
      "--rampup-batch-size", "4", "4", "16"],
     "--rampup-batch-size and --step-batch-size-schedule were both given"),
])
def test_invalid_schedules_are_refused_with_one_sentence(extra, message):
    with pytest.raises(ArgumentError) as info:
        validate_args(parse_args(NO_GBS + extra), 1)
    text = str(info.value)
    assert message in text
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0


def test_a_size_past_the_run_is_not_checked():
    """Like Megatron-LM, only sizes the run reaches must fit: 6 comes after 64 samples."""
    args = validate_args(parse_args(NO_GBS + ["--train-samples", "64",
                                              "--step-batch-size-schedule", "0:8 2.048K:6"]), 1)
    assert args.train_iters == 8 and args.global_batch_size == 4  # micro x data-parallel
