"""Megatron-LM's ``--ckpt-format torch_dist`` checkpoints, written by megatron-core 0.16.1
itself (tests/interop/mcore_torch_dist_side.py, in its own virtual environment, once per
module): read tensor for tensor, with megatron-core's logits, converted and trained from;
damaged or unsafe ones refused with one sentence naming the path."""

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.training.checkpoint_layout import (
    ModelCheckpoint,
    config_from_args,
    load_model_weights,
    open_model_checkpoint,
    retarget_args,
)
from megatron.training.checkpointing import CheckpointError
from megatron.training.torch_dist_checkpoint import TorchDistCheckpoint, is_torch_dist
from tests.helpers import REPO, free_port, lm_losses, run_pretrain

SIDE = os.path.join(REPO, "tests", "interop", "mcore_torch_dist_side.py")
TOKENS = [[1, 5, 9, 2, 100, 7, 3, 4], [8, 6, 4, 2, 0, 255, 31, 17]]
MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
             num_query_groups=2, swiglu=True, vocab_size=256, seq_length=16)
CASES = {  # one process: tied embeddings, RMSNorm; TP2 x PP2: untied, LayerNorm and biases
    "tp1": dict(tp=1, pp=1, model=dict(MODEL, normalization="RMSNorm", add_bias_linear=False,
                                       untie=False)),
    "tp2pp2": dict(tp=2, pp=2, model=dict(MODEL, normalization="LayerNorm",
                                          add_bias_linear=True, untie=True)),
}
ITERATION = 7
RUN = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "200",
       "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
       "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0", "--use-checkpoint-args"]


@pytest.fixture(scope="module")
def saved(mcore_python, tmp_path_factory):
    """{case: (checkpoint directory, {"tensors": whole tensors megatron-core's model held,
    "logits": its logits of TOKENS (one process only)})}."""
    out = tmp_path_factory.mktemp("torch_dist")
    cases = [dict(layout, dir=str(out / case), expected=str(out / f"{case}_expected.pt"),
                  iteration=ITERATION, seed=1234, port=free_port(), tokens=TOKENS)
             for case, layout in CASES.items()]
    run = subprocess.run([mcore_python, "-P", SIDE, json.dumps(cases)], capture_output=True,
                         text=True, cwd="/", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {case: (a["dir"], torch.load(a["expected"], weights_only=True))
            for case, a in zip(CASES, cases)}


@pytest.mark.parametrize("case", list(CASES))
def test_whole_tensors_equal_megatron_cores(saved, case):
    ckpt, expected = saved[case]
    iter_dir = os.path.join(ckpt, f"iter_{ITERATION:07d}")
    assert is_torch_dist(iter_dir)
    assert {".metadata", "common.pt", "metadata.json"} <= set(os.listdir(iter_dir))
    reader = open_model_checkpoint(ckpt)
    assert isinstance(reader, TorchDistCheckpoint)
    assert (reader.iteration, reader.release, reader.megatron_lm) == (ITERATION, False, True)
    layout = CASES[case]
    assert (reader.args["tensor_model_parallel_size"], reader.args["pipeline_model_parallel_size"],
            reader.args["normalization"], reader.args["norm_placement"]) == \
        (layout["tp"], layout["pp"], layout["model"]["normalization"], "pre")
    assert sorted(reader.names) == sorted(expected["tensors"])
    for name in reader.names:
        tensor = reader.tensor(name)
        assert reader.shape(name) == tuple(tensor.shape) and reader.dtype(name) == tensor.dtype
        assert torch.equal(tensor, expected["tensors"][name]), name


def test_same_logits_as_megatron_core(saved):
    """Our model with the weights read gives megatron-core's logits: its fused-norm names,
    stacked layers, GQA query/key/value rows and gate/up halves mean what ours do."""
    ckpt, expected = saved["tp1"]
    reader = TorchDistCheckpoint(ckpt)
    args = retarget_args(reader.args)
    model = GPTModel(config_from_args(args, params_dtype=torch.float32),
                     args["padded_vocab_size"]).eval()
    load_model_weights([model], reader)
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        ours = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))
    # fp32, the same arithmetic in another order: ~2e-7 apart on logits of size ~1.2 (a few
    # ulps); a mapping error would be O(0.1)
    assert expected["logits"].abs().max() > 0.5
    assert (ours - expected["logits"]).abs().max() <= 1e-5


def test_convert_to_our_format_at_another_layout(saved, tmp_path):
    sys.path[:0] = [os.path.join(REPO, "tools", "checkpoint"), os.path.join(REPO, "tools")]
    import convert
    ckpt, expected = saved["tp2pp2"]
    out = str(tmp_path / "ours")
    printed = io.StringIO()
    # --no-verify: convert's check needs transformers; the tensors are compared here instead
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = convert.main(["--model-type", "GPT", "--loader", "megatron", "--saver",
                             "megatron", "--load-dir", ckpt, "--save-dir", out,
                             "--target-tensor-parallel-size", "2", "--no-verify"])
    assert code == 0, printed.getvalue()
    ours = ModelCheckpoint(out)
    assert ours.args["tensor_model_parallel_size"] == 2 and ours.iteration == ITERATION
    for name in ours.names:
        assert torch.equal(ours.tensor(name), expected["tensors"][name]), name


def test_resume_without_optimizer_state(saved):
    """--no-load-optim keeps Megatron-LM's iteration and data position (14 samples + one
    batch of 2); the model's flags come from common.pt."""
    ckpt, _ = saved["tp2pp2"]
    code, lines = run_pretrain(RUN + ["--load", ckpt, "--no-load-optim",
                                      "--train-iters", str(ITERATION + 1)])
    assert code == 0, lines[-5:]
    assert any("successfully loaded checkpoint" in line and f"at iteration {ITERATION}" in line
               for line in lines)
    assert list(lm_losses(lines)) == [ITERATION + 1]
    assert any(re.search(r"consumed samples: +16 \|", line) for line in lines)


# --- damaged or unsafe checkpoints ---------------------------------------------------------------

class Evil:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _missing_chunk_file(d, marker):
    os.remove(os.path.join(d, "__0_1.distcp"))
    return os.path.join(d, "__0_1.distcp"), "is missing"


def _truncated_chunk_file(d, marker):
    path = os.path.join(d, "__0_0.distcp")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path, "is truncated"


def _missing_index(d, marker):
    os.remove(os.path.join(d, ".metadata"))
    return os.path.join(d, ".metadata"), "is missing"


def _truncated_index(d, marker):
    path = os.path.join(d, ".metadata")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path, "truncated or corrupt"


def _unfinished_save(d, marker):
    os.remove(os.path.join(d, "metadata.json"))
    return os.path.join(d, "metadata.json"), "did not finish"


def _unsafe_index(d, marker):
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(Evil(marker), f)
    return os.path.join(d, ".metadata"), "never run"


def _other_backend(d, marker):
    with open(os.path.join(d, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "zarr", "sharded_backend_version": 1}, f)
    return d, "--ckpt-convert-format torch"


DAMAGES = [_missing_chunk_file, _truncated_chunk_file, _missing_index, _truncated_index,
           _unfinished_save, _unsafe_index, _other_backend]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__[1:] for d in DAMAGES])
def test_damaged_checkpoint_is_refused_with_one_sentence(saved, tmp_path, damage):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(saved["tp1"][0], ckpt)
    iter_dir = os.path.join(ckpt, f"iter_{ITERATION:07d}")
    marker = str(tmp_path / "code_ran")
    path, words = damage(iter_dir, marker)
    assert is_torch_dist(iter_dir)
    with pytest.raises(CheckpointError) as e:
        TorchDistCheckpoint(ckpt)
    message = str(e.value)
    assert path in message and words in message, message
    assert "\n" not in message and message.endswith(".")
    assert not os.path.exists(marker)


def test_training_refuses_a_damaged_checkpoint_with_one_line(saved, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(saved["tp1"][0], ckpt)
    path, _ = _missing_chunk_file(os.path.join(ckpt, f"iter_{ITERATION:07d}"), None)
    code, lines = run_pretrain(RUN + ["--load", ckpt, "--finetune", "--train-iters", "1"])
    errors = [line for line in lines if "error:" in line]
    assert code == 2 and len(errors) == 1 and path in errors[0], lines[-5:]


def test_our_own_format_is_not_torch_dist(tmp_path):
    os.makedirs(tmp_path / "iter_0000001" / "mp_rank_00")
    (tmp_path / "iter_0000001" / "common.pt").write_bytes(b"")
    assert not is_torch_dist(str(tmp_path / "iter_0000001"))

