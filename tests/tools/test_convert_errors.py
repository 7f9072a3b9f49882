"""convert.py on bad input: one sentence naming the path and the problem, exit status 2, and
nothing left in (or beside) --save-dir."""

import json
import os
import shutil

import pytest
import torch

from tests.tools.test_convert import BASE, GLM4, LLAMA, run_convert, train

pytest.importorskip("transformers", reason="conversion to Hugging Face needs transformers")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, sp_model):
    """A trained Megatron checkpoint (TP=1) and its Llama export."""
    tmp = tmp_path_factory.mktemp("sources")
    ckpt = train(tmp, "ckpt", LLAMA, ["--tokenizer-type", "GPTSentencePieceTokenizer",
                                      "--tokenizer-model", sp_model])
    hf = str(tmp / "hf")
    code, printed = run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                                "--save-dir", hf)
    assert code == 0, printed
    return ckpt, hf


def refused(tmp_path, loader, saver, load_dir, *extra):
    """Run a conversion that must fail; return its one error line."""
    save = str(tmp_path / "out")
    code, printed = run_convert("--loader", loader, "--saver", saver, "--load-dir", load_dir,
                                "--save-dir", save, *extra)
    assert code == 2, printed
    errors = [line for line in printed.splitlines() if line.startswith("convert.py: error:")]
    assert len(errors) == 1, printed
    assert "Traceback" not in printed
    assert not os.path.exists(save)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    return errors[0]


def copy(src, tmp_path, name="copy"):
    dest = str(tmp_path / name)
    shutil.copytree(src, dest)
    return dest


def test_megatron_sources(tmp_path, sources):
    ckpt, _ = sources
    assert "does not exist" in refused(tmp_path, "megatron", "hf", str(tmp_path / "nowhere"))
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    assert "holds no checkpoint" in refused(tmp_path, "megatron", "hf", empty)
    bad = copy(ckpt, tmp_path, "tracker")
    with open(os.path.join(bad, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("7")
    line = refused(tmp_path, "megatron", "hf", bad)
    assert "iteration 7" in line and "iter_0000007" in line
    assert "iter_0000005" in refused(tmp_path, "megatron", "hf", ckpt, "--iteration", "5")
    truncated = copy(ckpt, tmp_path, "truncated")
    path = os.path.join(truncated, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    line = refused(tmp_path, "megatron", "hf", truncated)
    assert path in line and "truncated" in line
    pickled = copy(ckpt, tmp_path, "pickled")
    path = os.path.join(pickled, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, weights_only=True)
    state["args"]["tokenizer"] = Pickled()
    torch.save(state, path)
    line = refused(tmp_path, "megatron", "hf", pickled)
    assert path in line and "Pickled" in line


class Pickled:
    """Any class of one's own is pickled code to weights_only loading."""


def test_missing_tensor_parallel_shard(tmp_path, sp_model):
    from tests.helpers import run_distributed
    from tests.tools.test_convert import _train_parallel
    ckpt = str(tmp_path / "tp2")
    run = BASE + GLM4 + ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
                         sp_model, "--tensor-model-parallel-size", "2", "--save", ckpt]
    assert run_distributed(_train_parallel, 2, run) == [0, 0]
    shutil.rmtree(os.path.join(ckpt, "iter_0000002", "mp_rank_01"))
    line = refused(tmp_path, "megatron", "hf", ckpt)
    assert "mp_rank_01" in line and "tensor-parallel size 2" in line


def test_tokenizer_that_cannot_be_found(tmp_path, sources):
    ckpt, _ = sources
    line = refused(tmp_path, "megatron", "hf", ckpt, "--tokenizer-type",
                   "GPTSentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "no.model"))
    assert "no.model" in line and "does not exist" in line


def _rewrite_config(hf, tmp_path, name, **changes):
    dest = copy(hf, tmp_path, name)
    path = os.path.join(dest, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return dest


def _rewrite_tensors(hf, tmp_path, name, edit):
    from safetensors.torch import load_file, save_file
    dest = copy(hf, tmp_path, name)
    path = os.path.join(dest, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return dest


def test_hugging_face_sources(tmp_path, sources):
    _, hf = sources
    gpt2 = _rewrite_config(hf, tmp_path, "gpt2", architectures=["GPT2LMHeadModel"])
    line = refused(tmp_path, "hf", "megatron", gpt2)
    assert "GPT2LMHeadModel" in line and "LlamaForCausalLM" in line
    gelu = _rewrite_config(hf, tmp_path, "gelu", hidden_act="gelu")
    line = refused(tmp_path, "hf", "megatron", gelu)
    assert "hidden_act='gelu'" in line and "config.json" in line
    scaled = _rewrite_config(hf, tmp_path, "scaled", rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert "rope_type 'linear'" in refused(tmp_path, "hf", "megatron", scaled)
    missing = _rewrite_tensors(hf, tmp_path, "missing", lambda t: t.pop(
        "model.layers.1.self_attn.k_proj.weight"))
    line = refused(tmp_path, "hf", "megatron", missing)
    assert "model.layers.1.self_attn.k_proj.weight" in line and "lacks" in line

    def misshape(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]
    line = refused(tmp_path, "hf", "megatron", _rewrite_tensors(hf, tmp_path, "shape",
                                                                misshape))
    assert "model.layers.0.mlp.up_proj.weight" in line and "does not fit" in line

    def extra(t):
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    line = refused(tmp_path, "hf", "megatron", _rewrite_tensors(hf, tmp_path, "extra", extra))
    assert "q_norm" in line and "cannot represent" in line
    truncated = copy(hf, tmp_path, "truncated")
    path = os.path.join(truncated, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    assert "truncated" in refused(tmp_path, "hf", "megatron", truncated)
    not_a_model = str(tmp_path / "not_a_model")
    os.makedirs(not_a_model)
    assert "config.json does not exist" in refused(tmp_path, "hf", "megatron", not_a_model)


def test_missing_shard_of_a_sharded_export(tmp_path, sources):
    ckpt, _ = sources
    sharded = str(tmp_path / "sharded")
    assert run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                       "--save-dir", sharded, "--max-shard-size", "100KB",
                       "--no-verify")[0] == 0
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(sharded, victim))
    line = refused(tmp_path, "hf", "megatron", sharded)
    assert victim in line and "missing" in line


def test_save_dir_holding_a_model_needs_overwrite(tmp_path, sources):
    ckpt, hf = sources
    save = str(tmp_path / "out")
    shutil.copytree(hf, save)
    before = sorted(os.listdir(save))
    code, printed = run_convert("--loader", "megatron", "--saver", "megatron", "--load-dir",
                                ckpt, "--save-dir", save)
    assert code == 2 and "--overwrite" in printed
    assert sorted(os.listdir(save)) == before
    code, printed = run_convert("--loader", "megatron", "--saver", "megatron", "--load-dir",
                                ckpt, "--save-dir", save, "--overwrite")
    assert code == 0, printed
    assert sorted(os.listdir(save)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def test_bad_target_layout_and_flags(tmp_path, sources):
    ckpt, hf = sources
    line = refused(tmp_path, "megatron", "megatron", ckpt,
                   "--target-tensor-parallel-size", "3")
    assert "num_attention_heads" in line or "divisible" in line
    line = refused(tmp_path, "megatron", "megatron", ckpt,
                   "--target-pipeline-parallel-size", "2",
                   "--target-num-layers-per-virtual-pipeline-stage", "2")
    assert "divisible" in line
    assert "--max-shard-size" in refused(tmp_path, "megatron", "hf", ckpt, "--max-shard-size",
                                         "lots")
    assert "nothing to convert" in refused(tmp_path, "hf", "hf", hf)
