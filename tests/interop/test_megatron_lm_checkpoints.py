"""Checkpoints written by Megatron-LM / megatron-core (`torch` format): read safely, under
local and TransformerEngine names, at TP1 and TP2 x PP2 (virtual and uneven stages); trained
from at other layouts; exported to Hugging Face with megatron-core's own logits; refused
with one sentence when unsafe or beyond this codebase.

The checkpoints come from megatron-core 0.16.1 itself, in its own virtual environment
(tests/interop/mcore_checkpoint_side.py), written once per module.
"""

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.training.checkpoint_layout import ModelCheckpoint
from megatron.training.checkpointing import CheckpointError, read_checkpoint
from megatron.training.megatron_lm_checkpoint import (
    _rng_states,
    _safe_globals,
    args_from_namespace,
    our_name,
)
from tests.helpers import REPO, lm_losses, run_distributed, run_pretrain

SIDE = os.path.join(REPO, "tests", "interop", "mcore_checkpoint_side.py")
LAYOUTS = ("tp1", "tp2pp2vp", "tp2pp2uneven")
FILE = os.path.join("iter_0000003", "mp_rank_00", "model_optim_rng.pt")
RUN = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
       "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2",
       "--global-batch-size", "4", "--lr", "1e-3", "--num-workers", "0", "--log-interval", "1",
       "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0"]
# The saved model (mcore_checkpoint_side.MODEL) spelled as our flags.
MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--normalization",
         "RMSNorm", "--position-embedding-type", "rope", "--rotary-base", "100000",
         "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--seq-length", "32",
         "--max-position-embeddings", "32"]


@pytest.fixture(scope="module")
def saved(mcore_python, tmp_path_factory):
    """The directory megatron-core's side wrote (see its docstring for what is in it)."""
    out = tmp_path_factory.mktemp("megatron_lm")
    result = subprocess.run([mcore_python, "-P", SIDE, json.dumps({}), str(out)],
                            capture_output=True, text=True, cwd="/", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def error_line(lines):
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, lines[-5:]
    return errors[0]


# --- (a) reading ------------------------------------------------------------------------------

@pytest.mark.parametrize("names", ["local", "te"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_tensors_equal_megatron_cores(saved, layout, names):
    reader = ModelCheckpoint(str(saved / f"{layout}_{names}"))
    expected = torch.load(saved / f"expected_{layout}.pt", weights_only=True)
    assert reader.iteration == 3 and reader.megatron_lm
    assert sorted(reader.names) == sorted(expected)
    for name in reader.names:
        assert torch.equal(reader.tensor(name), expected[name]), name


def test_translated_state(saved):
    """Our format: our flags, no optimizer entry, the schedule's step count, and RNG states
    that restore Megatron-LM's generators exactly."""
    import random

    from megatron.core.tensor_parallel import get_rng_state, set_rng_state
    path = str(saved / "tp1_te" / FILE)
    state = read_checkpoint(path)
    assert set(state) == {"args", "checkpoint_version", "iteration", "megatron_lm", "model",
                          "opt_param_scheduler", "rng_state",
                          "num_floating_point_operations_so_far"}  # --log-progress's count
    args = state["args"]
    assert (args["norm_placement"], args["normalization"], args["num_query_groups"],
            args["ffn_hidden_size"], args["rotary_base"], args["params_dtype"],
            args["padded_vocab_size"], args["consumed_train_samples"]) == \
        ("pre", "RMSNorm", 2, 128, 100000, "float32", 128, 24)
    assert state["opt_param_scheduler"]["num_steps"] == 24
    assert not any(k.endswith("_extra_state") or "layer_norm_weight" in k for k in state["model"])
    with torch.serialization.safe_globals(_safe_globals()):
        raw = torch.load(path, weights_only=True)["rng_state"][0]
    assert raw["rng_tracker_states"].keys() == state["rng_state"][0]["rng_tracker_states"].keys()
    before = get_rng_state()
    try:
        set_rng_state(state["rng_state"][0])
        assert random.getstate() == raw["random_rng_state"]
        assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(),
                                                         raw["np_rng_state"]))
        assert torch.equal(torch.get_rng_state(), raw["torch_rng_state"])
    finally:
        set_rng_state(before)


def test_enums_and_other_argument_types_read_as_plain_values(saved):
    with torch.serialization.safe_globals(_safe_globals()):
        raw = torch.load(saved / "tp1_te" / FILE, weights_only=True)
    args = raw["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.attention_backend, args.model_type, args.exit_signal) == \
        ("auto", "encoder_or_decoder", "SIGTERM")
    assert isinstance(raw["model"]["decoder.layers.0.self_attention.core_attention._extra_state"],
                      io.BytesIO)


def test_our_names():
    layer = "decoder.layers.3."
    assert our_name(layer + "self_attention.linear_qkv.layer_norm_weight") == \
        layer + "input_layernorm.weight"
    assert our_name(layer + "mlp.linear_fc1.layer_norm_bias") == layer + "pre_mlp_layernorm.bias"
    assert our_name(layer + "mlp.linear_fc1.weight") == layer + "mlp.linear_fc1.weight"
    assert our_name(layer + "self_attention.linear_proj._extra_state") is None
    # both specs name the q/k norms as ours (TENorm or the local norm under q_layernorm)
    assert our_name(layer + "self_attention.q_layernorm.weight") == \
        layer + "self_attention.q_layernorm.weight"
    assert our_name("decoder.final_layernorm.weight") == "decoder.final_layernorm.weight"


def test_rng_states_of_another_device_are_dropped():
    """A GPU run's generator states (16-byte CUDA states) cannot seed a CPU run's dropout."""
    state = {"random_rng_state": (3, (0,) * 625, None),
             "np_rng_state": ("MT19937", np.zeros(624, "uint32"), 0, 0, 0.0),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None,
             "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}}
    assert _rng_states([state]) is None
    state["rng_tracker_states"] = {"model-parallel-rng": torch.get_rng_state()}
    assert _rng_states([state])[0]["np_rng_state"][0] == "MT19937"


# --- (b) training from a Megatron-LM checkpoint -------------------------------------------------

def test_finetune_at_another_layout_with_checkpoint_args(saved):
    """The model's flags come from the checkpoint; TP2 x PP2 x VP2 local names and TP1
    TransformerEngine names hold the same weights, so one-process runs print the same
    losses to the last digit."""
    curves = []
    for name in ("tp2pp2vp_local", "tp1_te"):
        code, lines = run_pretrain(RUN + ["--load", str(saved / name), "--finetune",
                                          "--use-checkpoint-args", "--train-iters", "3"])
        assert code == 0, lines[-5:]
        assert any("loaded weights from" in line for line in lines)
        curves.append(lm_losses(lines))
    assert sorted(curves[0]) == [1, 2, 3] and curves[0] == curves[1]


def _pretrain_on_rank(argv):
    code, lines = run_pretrain(argv)
    return code, lm_losses(lines)


def test_resume_without_optimizer_at_another_layout(saved):
    """--no-load-optim keeps Megatron-LM's iteration (3) and data position: TP2 from a TP1
    checkpoint continues as TP1 does (its RNG state restored; dropout is off here) within
    1e-5: the tensor-parallel sums round differently."""
    run = RUN + MODEL + ["--no-load-optim", "--train-iters", "5"]
    code, lines = run_pretrain(run + ["--load", str(saved / "tp1_local")])
    assert code == 0, lines[-5:]
    assert any("successfully loaded checkpoint" in line and "at iteration 3" in line
               for line in lines)
    one = lm_losses(lines)
    assert sorted(one) == [4, 5]
    results = run_distributed(_pretrain_on_rank, 2, run + [
        "--load", str(saved / "tp1_te"), "--tensor-model-parallel-size", "2"])
    assert all(code == 0 for code, _ in results)
    for i, value in one.items():
        assert float(results[-1][1][i]) == pytest.approx(float(value), rel=1e-5)


def test_plain_load_is_refused_with_one_sentence(saved):
    ckpt = str(saved / "tp2pp2uneven_te")
    code, lines = run_pretrain(RUN + MODEL + ["--load", ckpt, "--train-iters", "4"])
    line = error_line(lines)
    assert code == 2 and ckpt in line and "Megatron-LM" in line
    assert "--finetune" in line and "--no-load-optim" in line


# --- (c) Hugging Face export -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tp1_te", "tp2pp2uneven_local"])
def test_hugging_face_export_gives_megatron_cores_logits(saved, tmp_path, name):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    sys.path[:0] = [os.path.join(REPO, "tools", "checkpoint"), os.path.join(REPO, "tools")]
    import convert
    import hf_verify
    out = str(tmp_path / "hf")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = convert.main(["--model-type", "GPT", "--loader", "megatron", "--saver", "hf",
                             "--load-dir", str(saved / name), "--save-dir", out])
    assert code == 0, printed.getvalue()
    assert re.search(r"greedy continuations of \d+ tokens agree", printed.getvalue())
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == \
        ["LlamaForCausalLM"]
    mcore = torch.load(saved / "logits.pt", weights_only=True)
    tokens, vocab = mcore["tokens"], 101  # NullTokenizer: 100 ids and its EOD
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, local_files_only=True).eval()
    reader = ModelCheckpoint(str(saved / name))
    ours = hf_verify.our_model(reader.args, reader.tensor)
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
        mine = ours(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))[..., :vocab]
    expected = mcore["logits"][..., :vocab]
    # fp32 everywhere, the same arithmetic in another order: ~3e-6 apart on logits of size
    # ~3.5 (a few ulps grown over 4 layers); a mapping error would be O(0.1).
    assert expected.abs().max() > 2.0
    assert (theirs - expected).abs().max() <= 2e-5
    assert (mine - expected).abs().max() <= 2e-5


# --- (d) refusals ------------------------------------------------------------------------------

class Evil:
    """Unpickling this runs code: it would create the marker file (what a malicious
    checkpoint does)."""

    def __init__(self, marker, touch=False):
        self.marker = marker
        if touch:
            open(marker, "w").close()

    def __reduce__(self):
        return Evil, (self.marker, True)


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = str(tmp_path / "code_ran")
    ckpt = tmp_path / "evil"
    path = ckpt / FILE
    os.makedirs(path.parent)
    torch.save({"args": argparse.Namespace(num_layers=2, custom=Evil(marker)),
                "checkpoint_version": 3.0, "iteration": 3, "model": {}}, path)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(path))
    assert str(path) in str(e.value) and f"{__name__}.Evil" in str(e.value)
    code, lines = run_pretrain(RUN + MODEL + ["--load", str(ckpt), "--finetune",
                                              "--train-iters", "1"])
    line = error_line(lines)
    assert code == 2 and str(path) in line and "Evil" in line
    assert not os.path.exists(marker)


def test_unsupported_model_is_refused_naming_the_flag(saved, tmp_path):
    """A Megatron-LM checkpoint of a model with --qk-l2-norm (written as Megatron-LM writes
    its arguments) is refused by the reader and by pretrain, naming the flag."""
    ckpt = tmp_path / "qk_l2_norm"
    path = ckpt / FILE
    with torch.serialization.safe_globals(_safe_globals()):
        state = torch.load(saved / "tp1_local" / FILE, weights_only=True)
    state["args"].qk_l2_norm = True
    os.makedirs(path.parent)
    torch.save(state, path)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(CheckpointError, match="uses --qk-l2-norm, which this codebase cannot"):
        ModelCheckpoint(str(ckpt))
    code, lines = run_pretrain(RUN + MODEL + ["--load", str(ckpt), "--finetune",
                                              "--train-iters", "1"])
    line = error_line(lines)
    assert code == 2 and str(path) in line and "--qk-l2-norm" in line


def test_qk_layernorm_checkpoint_gives_megatron_cores_logits(saved, tmp_path):
    """megatron-core's q_layernorm / k_layernorm load under their own names with identical
    tensors; our model's logits and those of its Qwen3 export equal megatron-core's."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    sys.path[:0] = [os.path.join(REPO, "tools", "checkpoint"), os.path.join(REPO, "tools")]
    import convert
    import hf_verify
    reader = ModelCheckpoint(str(saved / "qk_layernorm_local"))
    expected = torch.load(saved / "expected_qk_layernorm.pt", weights_only=True)
    assert reader.args["qk_layernorm"] and not reader.args["apply_layernorm_1p"]
    assert sorted(reader.names) == sorted(expected)
    assert "decoder.layers.3.self_attention.k_layernorm.weight" in reader.names
    for name in reader.names:
        assert torch.equal(reader.tensor(name), expected[name]), name
    out = str(tmp_path / "hf")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = convert.main(["--model-type", "GPT", "--loader", "megatron", "--saver", "hf",
                             "--load-dir", str(saved / "qk_layernorm_local"), "--save-dir", out])
    assert code == 0, printed.getvalue()
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == \
        ["Qwen3ForCausalLM"]
    mcore = torch.load(saved / "logits_qk_layernorm.pt", weights_only=True)
    tokens, vocab = mcore["tokens"], 101
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, local_files_only=True).eval()
    ours = hf_verify.our_model(reader.args, reader.tensor)
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
        mine = ours(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))[..., :vocab]
    want = mcore["logits"][..., :vocab]
    # as in test_hugging_face_export_gives_megatron_cores_logits: a few fp32 ulps apart
    assert want.abs().max() > 2.0
    assert (mine - want).abs().max() <= 2e-5
    assert (theirs - want).abs().max() <= 2e-5


@pytest.mark.parametrize("field", ["apply_layernorm_1p", "layernorm_zero_centered_gamma"])
def test_zero_centred_gains_map_to_apply_layernorm_1p(saved, field):
    """Megatron-LM's --apply-layernorm-1p (megatron-core's layernorm_zero_centered_gamma)
    stores gains as ours do, so the flag carries over."""
    with torch.serialization.safe_globals(_safe_globals()):
        args = torch.load(saved / "tp1_local" / FILE, weights_only=True)["args"]
    assert not args_from_namespace(args, "ckpt/x.pt")["apply_layernorm_1p"]
    setattr(args, field, True)
    assert args_from_namespace(args, "ckpt/x.pt")["apply_layernorm_1p"]


@pytest.mark.parametrize("field, value, named", [
    ("num_experts", 8, "--num-experts"),
    ("multi_latent_attention", True, "--multi-latent-attention"),
    ("position_embedding_type", "yarn", "--position-embedding-type yarn"),
    ("add_qkv_bias", True, "--add-qkv-bias"),
    ("qk_l2_norm", True, "--qk-l2-norm"),
    ("softmax_type", "learnable", "--softmax-type learnable"),
    ("use_legacy_models", True, "--use-legacy-models"),
])
def test_unsupported_arguments_are_refused(saved, field, value, named):
    with torch.serialization.safe_globals(_safe_globals()):
        args = torch.load(saved / "tp1_local" / FILE, weights_only=True)["args"]
    setattr(args, field, value)
    with pytest.raises(CheckpointError, match="cannot hold yet") as e:
        args_from_namespace(args, "ckpt/x.pt")
    assert str(e.value).startswith("checkpoint ckpt/x.pt uses ") and named in str(e.value)
