"""--log-layer-stats and the update guards in one process: the file, resuming, bad flags, and
that a skipped update changes nothing (weights, optimizer state, schedule)."""

import json
import math

import pytest
import torch

import pretrain_gpt
from megatron.training import get_args
from megatron.training.update_guard import UpdateGuard
from tests.helpers import TINY_MODEL, lm_losses, run_pretrain

RUN = TINY_MODEL + ["--hidden-dropout", "0", "--attention-dropout", "0", "--num-layers", "3"]

# iteration -> factor the model's output is multiplied by in that iteration's forward
_DISTURB = {}


def disturbing_forward_step(data_iterator, model):
    """pretrain_gpt's forward step, with the output scaled at the iterations in ``_DISTURB``
    (NaN makes the loss and every gradient NaN; a large factor makes a loss spike)."""
    output, loss_fn = pretrain_gpt.forward_step(data_iterator, model)
    factor = _DISTURB.get(get_args().iteration + 1)
    return (output * factor if factor is not None else output), loss_fn


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_file_holds_run_train_valid_and_layer_lines(tmp_path):
    path = tmp_path / "stats.jsonl"
    code, lines = run_pretrain(RUN + ["--train-iters", "6", "--norm-placement", "peri",
                                      "--embedding-norm", "--eval-interval", "3",
                                      "--eval-iters", "1", "--log-layer-stats",
                                      "--layer-stats-interval", "3",
                                      "--layer-stats-file", str(path)])
    assert code == 0, lines[-3:]
    records = read(path)
    assert records[0]["type"] == "run" and records[0]["label"] == "peri+embnorm"
    assert records[0]["layer_placements"] == ["peri"] * 3
    train = [r for r in records if r["type"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, 7))
    printed = lm_losses(lines)
    for r in train:  # the same loss the log line prints
        assert f"{r['lm_loss']:.6E}" == printed[r["iteration"]]
    assert [r["iteration"] for r in records if r["type"] == "valid"] == [3, 6, 6]
    steps = [r for r in records if r["type"] == "layer_stats"]
    assert [r["iteration"] for r in steps] == [3, 6]
    layers = steps[-1]["layers"]
    assert [e["kind"] for e in layers] == ["embedding", "peri", "peri", "peri", "output"]
    assert set(layers[2]) >= {"residual", "attention", "attention_normed", "mlp", "mlp_normed",
                              "grad_norm", "norms"}
    # per-layer gradient norms make up the global one
    total = math.sqrt(sum(e["grad_norm"] ** 2 for e in layers))
    assert total == pytest.approx(steps[-1]["grad_norm"], rel=1e-5)
    assert set(layers[1]["norms"]) == {"input_layernorm", "post_self_attn_layernorm",
                                       "pre_mlp_layernorm", "post_mlp_layernorm"}
    assert "embedding_norm" in layers[0]["norms"]


def test_resumed_run_drops_lines_past_its_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = RUN + ["--norm-placement", "pre", "--log-layer-stats", "--layer-stats-interval",
                    "2", "--save", str(ckpt), "--save-interval", "2"]
    code, _ = run_pretrain(common + ["--train-iters", "6", "--exit-interval", "3"])
    assert code == 0
    path = ckpt / "layer_stats.jsonl"  # the default place: the save directory
    assert [r["iteration"] for r in read(path) if r["type"] == "train"] == [1, 2, 3]
    # as if the job had died before its save at iteration 3: it resumes from iteration 2
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    code, _ = run_pretrain(common + ["--train-iters", "6", "--load", str(ckpt)])
    assert code == 0
    records = read(path)
    assert [r["iteration"] for r in records if r["type"] == "run"] == [0, 2]
    assert [r["iteration"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in records if r["type"] == "layer_stats"] == [2, 4, 6]


@pytest.mark.parametrize("flags,message", [
    (["--layer-stats-interval", "0"], "--layer-stats-interval 0 must be a positive"),
    (["--layer-stats-interval", "-5", "--log-layer-stats"], "--layer-stats-interval -5"),
    (["--log-layer-stats"], "--log-layer-stats needs a place for layer_stats.jsonl"),
    (["--log-layer-stats", "--layer-stats-file", "/"], "--layer-stats-file / is a directory"),
    (["--log-layer-stats", "--layer-stats-file", __file__ + "/stats.jsonl"],
     "is not a writable folder"),  # a file where a folder should be
    (["--max-nan-iterations", "0"], "--max-nan-iterations 0 must be positive"),
    (["--spike-window", "3"], "--spike-window 3 must be at least 10"),
    (["--spike-threshold", "-1"], "--spike-threshold -1.0 must be a positive"),
])
def test_bad_flags_get_one_sentence(flags, message):
    code, lines = run_pretrain(RUN + ["--train-iters", "2"] + flags)
    assert code == 2
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and message in errors[0], lines[-3:]


def _checkpoint(ckpt, iteration):
    return torch.load(ckpt / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt",
                      weights_only=True)


def assert_unchanged(before, after, fp16=False):
    """Weights, optimizer state (moments, step, loss scaler) and schedule are bit-identical.
    Under fp16 the loss scaler cannot tell a NaN from an overflow: it backs off, as it does in
    Megatron-LM."""
    models = [k for k in before if k.startswith("model")]  # model0, model1: virtual stages
    assert models
    for model in models:
        for key, tensor in before[model].items():
            assert torch.equal(tensor, after[model][key]), (model, key)
    opt_b, opt_a = before["optimizer"], after["optimizer"]
    assert opt_b["step"] == opt_a["step"] > 0
    if fp16:
        assert opt_a["grad_scaler"]["scale"] == opt_b["grad_scaler"]["scale"] / 2
    else:
        assert opt_b.get("grad_scaler") == opt_a.get("grad_scaler")
    for chunk, params in opt_b["param_state"].items():
        for name, state in params.items():
            for key, tensor in state.items():
                assert torch.equal(tensor, opt_a["param_state"][chunk][name][key]), (name, key)
    assert before["opt_param_scheduler"] == after["opt_param_scheduler"]


@pytest.mark.parametrize("precision", [[], ["--bf16"], ["--fp16", "--initial-loss-scale", "64",
                                                            "--hysteresis", "1"]])
def test_nan_step_is_skipped_counted_and_stops_the_run(tmp_path, precision):
    ckpt = tmp_path / "ckpt"
    _DISTURB.clear()
    _DISTURB.update({3: float("nan"), 5: float("nan")})
    try:
        code, lines = run_pretrain(
            RUN + precision + ["--train-iters", "8", "--norm-placement", "peri", "--save",
                               str(ckpt), "--save-interval", "1", "--max-nan-iterations", "2"],
            forward_step=disturbing_forward_step)
    finally:
        _DISTURB.clear()
    assert code == 1
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and "stopped at iteration 5 after 2 steps with a NaN" in errors[0]
    log = {int(line.split("iteration")[1].split("/")[0]): line for line in lines
           if " iteration " in line and "consumed samples" in line}
    assert sorted(log) == [1, 2, 3, 4, 5]  # stopped after the second NaN step
    for i in (3, 5):
        assert "number of nan iterations:   1" in log[i]
        assert "number of skipped iterations:   1" in log[i]
    assert "number of nan iterations:   0" in log[4]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    fp16 = "--fp16" in precision
    assert_unchanged(_checkpoint(ckpt, 2), _checkpoint(ckpt, 3), fp16)
    assert_unchanged(_checkpoint(ckpt, 4), _checkpoint(ckpt, 5), fp16)


def test_nan_check_off_skips_but_never_stops(tmp_path):
    _DISTURB.clear()
    _DISTURB.update({2: float("nan"), 3: float("nan")})
    try:
        code, lines = run_pretrain(RUN + ["--train-iters", "4", "--max-nan-iterations", "1",
                                          "--no-check-for-nan-in-loss-and-grad"],
                                   forward_step=disturbing_forward_step)
    finally:
        _DISTURB.clear()
    assert code == 0 and sorted(lm_losses(lines)) == [1, 4]


def test_spiky_update_is_skipped_and_changes_nothing(tmp_path):
    ckpt = tmp_path / "ckpt"
    _DISTURB.clear()
    _DISTURB[14] = 30.0  # logits x 30: the loss and grad norm jump far above the window
    try:
        code, lines = run_pretrain(
            RUN + ["--train-iters", "15", "--norm-placement", "pre", "--save", str(ckpt),
                   "--save-interval", "13", "--exit-interval", "14",
                   "--skip-spiky-updates", "--spike-window", "10",
                   "--lr", "1e-4", "--log-layer-stats", "--layer-stats-interval", "100"],
            forward_step=disturbing_forward_step)
    finally:
        _DISTURB.clear()
    assert code == 0, lines[-3:]
    assert any("skipped the update of iteration 14" in line for line in lines)
    log = [line for line in lines if " iteration       14/" in line][0]
    assert "number of skipped iterations:   1" in log and "number of nan iterations:   0" in log
    assert_unchanged(_checkpoint(ckpt, 13), _checkpoint(ckpt, 14))
    train = {r["iteration"]: r for r in read(ckpt / "layer_stats.jsonl") if r["type"] == "train"}
    assert train[14]["spike"] == 1 and train[14]["skipped"] == 1 and train[13]["spike"] == 0


class _Args:
    check_for_nan_in_loss_and_grad = True
    max_nan_iterations = 3
    skip_spiky_updates = True
    spike_threshold = 4.0
    spike_window = 20


def test_spike_rule_needs_history_and_floors_the_spread():
    guard = UpdateGuard(_Args())
    assert not guard.should_skip(100.0, 1.0)  # no history yet: nothing is a spike
    guard = UpdateGuard(_Args())
    for _ in range(10):
        assert not guard.should_skip(5.0, 1.0)  # a flat curve: spread 0, floored at 1%
    assert not guard.should_skip(5.15, 1.0)  # 3 floored deviations: below 4
    assert guard.should_skip(5.25, 1.0) and guard.last.startswith("loss 5.25 above 5.2")
    assert guard.should_skip(5.0, 1.1) and guard.last.startswith("grad norm")
    assert guard.spike_iterations == 2 and len(guard.windows["loss"]) == 11
    assert guard.should_skip(float("nan"), 1.0) and guard.last == "nan"
    assert guard.nan_iterations == 1 and not guard.should_stop()
