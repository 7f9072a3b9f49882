"""Logging as Megatron-LM logs: TensorBoard and W&B scalars, throughput, params norm, zeros in
the gradients and the timers block, checked against the log line and against hand counts."""

import glob
import json
import math
import os
import re

import pytest
import torch

from megatron.training import flops
from megatron.training.arguments import ArgumentError, parse_args, validate_args
from tests.helpers import TINY_MODEL, lm_losses, run_distributed, run_pretrain, validation_losses

NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]
STATS = ["--log-params-norm", "--log-num-zeros-in-grad"]
# Untied: the input embedding rows of tokens absent from a batch get exactly zero gradient.
UNTIED = ["--untie-embeddings-and-output-weights"]
NO_BIAS = ["--disable-bias-linear"]


def _field(lines, name):
    """{iteration: value string} of ``name: value |`` in the log lines."""
    found = {}
    for line in lines:
        m = re.search(r"iteration\s+(\d+)/.*\| " + re.escape(name) + r": (\S+) \|", line)
        if m:
            found[int(m.group(1))] = m.group(2)
    return found


def _scalars(logdir):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="needs the tensorboard package (pip install tensorboard)")
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_megatrons_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard package")
    tb = str(tmp_path / "tb")
    code, lines = run_pretrain(TINY_MODEL + NO_DROPOUT + STATS + UNTIED + [
        "--train-iters", "3", "--eval-interval", "3", "--eval-iters", "1", "--log-throughput",
        "--tensorboard-dir", tb, "--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
        "--log-world-size-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--timing-log-level", "1", "--log-layer-stats", "--layer-stats-interval", "3"])
    assert code == 0, lines[-3:]
    s = _scalars(tb)
    # layer statistics: the JSONL (in the TensorBoard folder, for want of --save) and the tags
    with open(os.path.join(tb, "layer_stats.jsonl")) as f:
        step, = [json.loads(x) for x in f if '"layer_stats"' in x]
    for entry in step["layers"]:
        prefix = f"layer-stats/layer-{entry['layer']:02d}"
        assert s[f"{prefix}/grad-norm"] == [(3, pytest.approx(entry["grad_norm"], rel=1e-6))]
        if "residual" in entry:
            assert s[f"{prefix}/residual-max_abs"] == [
                (3, pytest.approx(entry["residual"]["max_abs"], rel=1e-6))]
    for tag in ["learning-rate", "batch-size", "lm loss", "loss-scale", "world-size",
                "grad-norm", "num-zeros", "params-norm"]:
        assert [step for step, _ in s[tag]] == [1, 2, 3], tag
        assert [step for step, _ in s[tag + " vs samples"]] == [8, 16, 24], tag
    # TensorBoard stores float32: 1e-6 relative covers it against the printed 7 digits
    for tag, field in [("lm loss", "lm loss"), ("learning-rate", "learning rate")]:
        printed = _field(lines, field)
        for step, value in s[tag]:
            assert value == pytest.approx(float(printed[step]), rel=1e-6, abs=1e-12), tag
    for tag, field in [("grad-norm", "grad norm"), ("params-norm", "params norm")]:
        for step, value in s[tag]:  # printed with 3 decimals
            assert f"{value:.3f}" == _field(lines, field)[step], tag
    for step, value in s["num-zeros"]:
        assert int(value) == int(_field(lines, "num zeros")[step]) > 0
    assert {v for _, v in s["batch-size"]} == {8.0} and {v for _, v in s["world-size"]} == {1.0}
    assert {v for _, v in s["loss-scale"]} == {1.0}
    assert s["mem-reserved-bytes"][0][1] > 0 and s["mem-max-allocated-bytes"][0][1] > 0
    # evaluation at iteration 3, then the final validation and test sets (same tag, as Megatron)
    printed = [float(v) for v in validation_losses(lines)]
    assert [v for _, v in s["lm loss validation"]] == pytest.approx(printed, rel=1e-6)
    assert [v for _, v in s["lm loss validation ppl"]] == \
        pytest.approx([math.exp(v) for v in printed], rel=1e-5)
    assert {step for step, _ in s["lm loss validation vs samples"]} == {24}
    # timers (seconds, max over ranks, per iteration of the interval) and throughput
    for name in ["forward-backward", "optimizer", "all-grads-sync", "optimizer-inner-step"]:
        assert s[name + "-time"][0][1] > 0, name
    args = _tiny_args(UNTIED)
    (step, seconds), = [x for x in s["iteration-time"] if x[0] == 3]
    expected = flops.model_floating_point_operations(args, 8) / (seconds * 1e12)
    assert dict(s["throughput"])[3] == pytest.approx(expected, rel=1e-5)
    line = next(x for x in lines if "iteration        3/" in x)
    assert re.search(r"\| elapsed time per iteration \(ms\): [\d.]+ \| throughput per GPU "
                     r"\(TFLOP/s/GPU\): [\d.]+ \| learning rate:", line)
    assert re.search(r"\| grad norm: [\d.]+ \| num zeros: \d+ \| params norm: [\d.]+ \| "
                     r"number of skipped", line)


def test_params_norm_is_the_norm_of_the_saved_weights(tmp_path):
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "2", "--log-params-norm",
                                             "--save", str(tmp_path)])
    assert code == 0, lines[-3:]
    state = torch.load(tmp_path / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=True)["model"]
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in state.values()
                         if isinstance(t, torch.Tensor)))
    assert _field(lines, "params norm")[2] == f"{norm:.3f}"


def _tiny_args(extra=(), padded_vocab=512):
    args = validate_args(parse_args(TINY_MODEL + list(extra) + ["--train-iters", "1"]),
                         world_size=1)
    args.padded_vocab_size = padded_vocab
    return args


def test_model_flops_counted_by_hand():
    """TINY_MODEL: h=64, L=2, 4 heads of 16 (no GQA), s=32, ffn=4h=256, vocab padded to 512,
    global batch 8 -> 256 tokens. Per token, x3 (fwd+bwd) x2 (multiply-add):
      MLP        6 * 64 * 256 * 2             = 196,608 per layer
      QKV + out  6 * (64 * 192 + 64 * 64)     =  98,304 per layer
      logits     6 * 64 * 512                 = 196,608
    -> 256 * (2 * 294,912 + 196,608) = 201,326,592; causal attention 8 * 32^2 * 6 * 64 * 2
    = 6,291,456 -> 207,618,048 (Megatron-LM's number). Norms: 6 * 64 = 384 FLOPs per token
    each, 98,304 per norm over the batch."""
    args = _tiny_args()
    assert flops.num_floating_point_operations(args, 8) == 207_618_048
    norm = 256 * 6 * 64
    for placement, extra, norms in [("pre", [], 2 * 2 + 1), ("post", [], 2 * 2),
                                    ("peri", [], 4 * 2 + 1), ("mix", [], 2 * 2 + 1),
                                    ("peri", ["--embedding-norm"], 4 * 2 + 2)]:
        args = _tiny_args(extra + ["--norm-placement", placement])
        assert flops.count_norms(args) == norms, placement
        assert flops.model_floating_point_operations(args, 8) == 207_618_048 + norms * norm
    # swiglu: MLP x3/2; GQA with 2 groups: K and V projections halve
    args = _tiny_args(["--swiglu", "--ffn-hidden-size", "256", "--group-query-attention",
                       "--num-query-groups", "2"])
    per_layer = 6 * 64 * 256 * 3 + 6 * (64 * (64 + 2 * 32) + 64 * 64)
    assert flops.num_floating_point_operations(args, 8) == \
        256 * (2 * per_layer + 6 * 64 * 512) + 6_291_456
    assert flops.throughput_tflops_per_device(args, 0.5, 8) == \
        flops.model_floating_point_operations(args, 8) / 0.5e12


def test_timers_print_megatrons_block():
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "2", "--log-interval", "2",
                                             "--timing-log-level", "2"])
    assert code == 0, lines[-3:]
    start = lines.index("(min, max) time across ranks (ms):")
    assert "iteration        2/" in lines[start - 1]
    block = {}
    for line in lines[start + 1:]:
        m = re.fullmatch(r"    (\S+) \.+: \(([\d.]+), ([\d.]+)\)", line)
        if not m:
            break
        block[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    for name in ["forward-backward", "all-grads-sync", "optimizer", "optimizer-inner-step",
                 "batch-generator", "forward-compute", "backward-compute"]:
        assert name in block, name
    assert block["forward-backward"][0] >= block["forward-compute"][0] > 0
    assert all(f"    {name} ".ljust(52, ".") + ": (" in "\n".join(lines) for name in block)
    # level 0 (the default): no block
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "1"])
    assert code == 0 and not any("time across ranks" in x for x in lines)


def test_wandb_offline_run_gets_the_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="needs the wandb package (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    original = wandb.sdk.wandb_run.Run.log

    def record(self, data, step=None, *a, **k):
        logged.append((step, dict(data)))
        return original(self, data, step, *a, **k)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", record)
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "2", "--eval-interval", "2",
                                             "--eval-iters", "1", "--log-params-norm",
                                             "--wandb-project", "periln-test",
                                             "--wandb-exp-name", "tiny", "--save",
                                             str(tmp_path / "ckpt"), "--log-layer-stats",
                                             "--layer-stats-interval", "2"])
    assert code == 0, lines[-3:]
    by_name = {}
    for step, data in logged:
        for key, value in data.items():
            by_name.setdefault(key, []).append((step, value))
    assert [s for s, _ in by_name["lm loss"]] == [1, 2]
    for step, value in by_name["lm loss"]:
        assert f"{value:.6E}" == lm_losses(lines)[step]
    for key in ["learning-rate", "batch-size", "loss-scale", "grad-norm", "params-norm",
                "samples vs steps"]:
        assert [s for s, _ in by_name[key]] == [1, 2], key
    assert [f"{v:.6E}" for _, v in by_name["lm loss validation"]] == validation_losses(lines)
    assert [s for s, _ in by_name["layer-stats/layer-01/residual-var"]] == [2]
    assert [s for s, _ in by_name["layer-stats/layer-02/input_layernorm-gain-mean"]] == [2]
    # the offline run's files, under <save>/wandb by default
    assert glob.glob(str(tmp_path / "ckpt" / "wandb" / "wandb" / "offline-run-*" / "*.wandb"))


def test_missing_packages_and_names_are_one_line_errors(monkeypatch):
    from megatron.training import logging_args
    monkeypatch.setattr(logging_args, "_missing", lambda module: True)
    with pytest.raises(ArgumentError, match=r"pip install tensorboard"):
        validate_args(parse_args(TINY_MODEL + ["--train-iters", "1", "--tensorboard-dir", "x"]),
                      world_size=1)
    base = TINY_MODEL + ["--train-iters", "1", "--wandb-project", "p"]
    with pytest.raises(ArgumentError, match=r"needs --wandb-exp-name"):
        validate_args(parse_args(base), world_size=1)
    with pytest.raises(ArgumentError, match=r"pip install wandb"):
        validate_args(parse_args(base + ["--wandb-exp-name", "e", "--save", "s"]), world_size=1)
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "1", "--tensorboard-dir", "x"])
    assert code == 2 and len(lines) == 1 and "pip install tensorboard" in lines[0]


def _stats_lines(extra):
    _, lines = run_pretrain(TINY_MODEL + NO_DROPOUT + STATS + UNTIED + NO_BIAS +
                            ["--train-iters", "3"] + extra)
    return lines


def _two_rank_runs():
    """Three layouts in one spawned pair of processes (start-up is the slow part)."""
    return {"TP=2": _stats_lines(["--tensor-model-parallel-size", "2"]),
            "DP=2 distributed optimizer": _stats_lines(["--use-distributed-optimizer"]),
            "PP=2 timers": run_pretrain(TINY_MODEL + [
                "--train-iters", "2", "--log-interval", "2", "--pipeline-model-parallel-size",
                "2", "--timing-log-level", "2", "--timing-log-option", "all"])[1]}


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_two_rank_runs, 2)[1]  # the last rank prints


def test_params_norm_and_zeros_count_each_parameter_once_across_ranks(two_ranks):
    """TP=2 splits the matrices and the vocabulary and duplicates the norms; DP=2 with the
    distributed optimizer shards everything: both print one process's norm and zeros.
    Without linear biases: the key bias's true gradient is 0, so whether rounding noise
    leaves some of its elements exactly 0 depends on the summation order."""
    one = _stats_lines([])
    assert len(_field(one, "num zeros")) == 3 and int(_field(one, "num zeros")[1]) > 0
    for layout in ("TP=2", "DP=2 distributed optimizer"):
        lines = two_ranks[layout]
        assert _field(lines, "num zeros") == _field(one, "num zeros"), layout
        assert _field(lines, "params norm") == _field(one, "params norm"), layout


def test_pipeline_timers_gathered_from_both_stages(two_ranks):
    lines = two_ranks["PP=2 timers"]
    start = lines.index("times across ranks (ms):")
    text = "\n".join(lines[start:])
    for name in ["forward-send", "forward-recv", "backward-send", "backward-recv",
                 "forward-compute", "backward-compute", "forward-backward"]:
        assert f"\n  {name}:" in text, name
    assert re.search(r"\n  forward-backward:\n     rank  0: [\d.]+\n     rank  1: [\d.]+", text)
