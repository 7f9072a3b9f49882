"""pretrain_gpt.py with activation recomputation under tensor + sequence and pipeline
parallelism: with dropout on, the loss curve of every recomputation setting is the curve
without it (the random states, the tracker's included, are restored for the second forward
pass), and the flags' rules give one sentence each."""

import pytest

from tests.helpers import TINY_MODEL, lm_losses, run_distributed, run_pretrain

RUN = TINY_MODEL + ["--norm-placement", "peri", "--normalization", "RMSNorm", "--swiglu",
                    "--position-embedding-type", "rope", "--num-layers", "4",
                    "--train-iters", "5", "--micro-batch-size", "2",
                    "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
RECOMPUTE = {
    "none": [],
    "full uniform 2": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "2"],
    "full block 1": ["--recompute-granularity", "full", "--recompute-method", "block",
                     "--recompute-num-layers", "1"],
    "selective (all parts)": ["--recompute-activations", "--recompute-modules", "core_attn",
                              "mlp", "layernorm", "output_norm"],
}
LAYOUTS = {"TP=2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
           "PP=2": ["--pipeline-model-parallel-size", "2"]}


def _curves(layouts):
    out = {}
    for layout, flags in layouts.items():
        for name, recompute in RECOMPUTE.items():
            code, lines = run_pretrain(RUN + flags + recompute)
            assert code == 0, (layout, name, lines[-3:])
            out[(layout, name)] = lm_losses(lines)
    return out


def test_recomputation_repeats_the_curve_under_tensor_and_pipeline_parallelism():
    curves = run_distributed(_curves, 2, LAYOUTS)[-1]  # the last rank prints the losses
    for layout in LAYOUTS:
        reference = curves[(layout, "none")]
        assert sorted(reference) == [1, 2, 3, 4, 5]
        for name in RECOMPUTE:  # the printed losses are equal digit for digit
            assert curves[(layout, name)] == reference, (layout, name)


@pytest.mark.parametrize("flags, expected", [
    (["--recompute-granularity", "full"], "needs --recompute-method {uniform,block}"),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "0"], "--recompute-num-layers 0 must be at least 1"),
    (["--recompute-method", "uniform"], "need --recompute-granularity"),
    (["--recompute-activations", "--recompute-num-layers", "2"],
     "apply to --recompute-granularity full"),
    (["--recompute-activations", "--recompute-modules", "attention"],
     "--recompute-modules attention is not available"),
])
def test_recompute_flags_one_sentence(flags, expected):
    code, lines = run_pretrain(RUN + flags)
    assert code == 2 and expected in lines[-1], lines[-3:]
