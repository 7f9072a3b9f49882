"""Flags that cannot work are refused with one sentence naming the flag, before any work."""

import os
import subprocess
import sys

import pytest

from megatron.training.arguments import ArgumentError, parse_args, validate_args
from tests.helpers import REPO, TINY_MODEL


def validate(*extra, world_size=1):
    return validate_args(parse_args(TINY_MODEL + ["--train-iters", "2", *extra]), world_size)


@pytest.mark.parametrize("extra,message", [
    (["--hidden-size", "66"], "--hidden-size 66 is not divisible by --num-attention-heads 4"),
    (["--group-query-attention", "--num-query-groups", "3"],
     "--num-query-groups 3 does not divide --num-attention-heads 4"),
    (["--global-batch-size", "6"], "--global-batch-size 6 is not a multiple of "
                                   "--micro-batch-size 4 x data-parallel size 1 = 4"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 were both given"),
    (["--norm-placement", "side"], "--norm-placement: invalid choice: 'side'"),
    (["--mix-ln-alpha", "1.5"], "--mix-ln-alpha 1.5 must lie in [0, 1]"),
    (["--tensor-model-parallel-size", "2"], "world size 1 is not divisible by "
                                            "--tensor-model-parallel-size 2"),
    (["--seq-length", "64", "--max-position-embeddings", "32"],
     "--max-position-embeddings 32 is shorter than --seq-length 64"),
    (["--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "choose one"),
    (["--ffn-hidden-size", "0"], "--ffn-hidden-size 0 must be a positive integer"),
    (["--not-a-flag"], "Unrecognized argument --not-a-flag"),
])
def test_refused_with_flag_named(extra, message):
    with pytest.raises(ArgumentError) as info:
        validate(*extra)
    text = str(info.value)
    assert message in text
    assert "\n" not in text and text.endswith((".", "?"))  # "?": "did you mean --x?"


def test_global_batch_checks_data_parallel_size():
    args = validate("--global-batch-size", "16", world_size=2)
    assert args.data_parallel_size == 2 and args.num_microbatches == 2
    with pytest.raises(ArgumentError, match="data-parallel size 2 = 8"):
        validate("--global-batch-size", "12", world_size=2)


def test_derived_defaults_like_megatron():
    args = validate("--swiglu")
    assert args.global_batch_size == 8 and args.num_microbatches == 2
    assert args.ffn_hidden_size == int(4 * 64 * 2 / 3 / 64) * 64
    assert args.max_position_embeddings == 32 and args.lr_decay_iters == 2
    assert args.num_query_groups == 4 and args.kv_channels == 16


def test_megatron_fusion_flags_are_accepted():
    validate("--use-mcore-models", "--no-masked-softmax-fusion", "--use-flash-attn")


def test_command_line_error_is_one_line_without_traceback():
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *TINY_MODEL,
           "--train-iters", "2", "--hidden-size", "66"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pretrain_gpt.py: error: --hidden-size 66 is not divisible by --num-attention-heads "
        "4; the hidden size must be a multiple of the number of heads (or set --kv-channels)."]
    assert "building GPT model" not in result.stdout  # refused before any model is built


@pytest.mark.parametrize("extra,message", [
    (["--num-attention-heads", "6", "--hidden-size", "48"],
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--group-query-attention", "--num-query-groups", "2"],
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--ffn-hidden-size", "130"], "--ffn-hidden-size 130 is not divisible by "
                                   "--tensor-model-parallel-size 4"),
    (["--sequence-parallel", "--seq-length", "30"],
     "--seq-length 30 is not divisible by --tensor-model-parallel-size 4"),
])
def test_tensor_parallel_splits_are_checked(extra, message):
    with pytest.raises(ArgumentError, match=message):
        validate("--tensor-model-parallel-size", "4", "--num-attention-heads", "4", *extra,
                 world_size=4)


def test_world_size_must_hold_the_model_parallel_layout():
    with pytest.raises(ArgumentError, match="world size 6 is not divisible by "
                                            "--tensor-model-parallel-size 4"):
        validate("--tensor-model-parallel-size", "4", world_size=6)
    args = validate("--tensor-model-parallel-size", "2", "--global-batch-size", "8",
                    world_size=4)
    assert args.data_parallel_size == 2 and args.num_microbatches == 1


@pytest.mark.parametrize("extra,world,message", [
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2,
     "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "--num-layers 4 is not divisible by --pipeline-model-parallel-size 2 x "
     "--num-layers-per-virtual-pipeline-stage 3"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "4"], 2,
     "the interleaved schedule needs the number of micro-batches (1"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "3"], 4,
     "world size 4 is not divisible by --tensor-model-parallel-size 1 x "
     "--pipeline-model-parallel-size 3"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--decoder-first-pipeline-num-layers", "4"], 2, "leaves 0 layers"),
])
def test_pipeline_layouts_are_checked(extra, world, message):
    with pytest.raises(ArgumentError) as info:
        validate(*extra, world_size=world)
    assert message in str(info.value)
