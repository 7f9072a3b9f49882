"""Hugging Face export and import of --qk-layernorm and --apply-layernorm-1p models: Pre-LN
with q/k norms is Qwen3ForCausalLM, other placements use our modeling file; zero-centred
gains export as 1 + gain into every class; Qwen3 imports back (never as 1p)."""

import os

import pytest
import torch

from megatron.training.checkpoint_layout import ModelCheckpoint
from tests.tools.test_convert import GLM4, GQA, LLAMA, check_export, run_convert, train

QK, ONE_P = ["--qk-layernorm"], ["--apply-layernorm-1p"]

NATIVE = {
    "qwen3-gqa-1p": (LLAMA + GQA + QK + ONE_P + ["--disable-bias-linear"], "Qwen3ForCausalLM"),
    "qwen3-untied-base": (LLAMA + QK + ["--disable-bias-linear", "--rotary-base", "50000",
                                        "--untie-embeddings-and-output-weights"],
                          "Qwen3ForCausalLM"),
    "llama-1p-embnorm": (LLAMA + ONE_P + ["--embedding-norm"], "LlamaForCausalLM"),
    "glm4-1p": (GLM4 + ONE_P, "Glm4ForCausalLM"),
}
REMOTE = {
    "peri-layernorm-qk-1p-embnorm": ["--norm-placement", "peri", "--embedding-norm"] + QK + ONE_P,
    "mix-rmsnorm-qk-rope": ["--norm-placement", "mix", "--num-layers", "3", "--normalization",
                            "RMSNorm", "--swiglu", "--position-embedding-type", "rope"] + QK,
    "pre-qk-with-biases": LLAMA + QK,
}


@pytest.fixture(scope="module")
def sp_flags(sp_model):
    return ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model]


def _export(ckpt, out):
    code, printed = run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                                "--save-dir", out)
    assert code == 0, printed
    assert "greedy continuations of 32 tokens agree" in printed
    return printed


@pytest.mark.parametrize("case", list(NATIVE))
def test_native_export_matches_ours(tmp_path, sp_flags, case):
    flags, expected = NATIVE[case]
    ckpt = train(tmp_path, "ckpt", flags, sp_flags)
    out = str(tmp_path / "hf")
    _export(ckpt, out)
    check_export(ckpt, out, expected, remote=False)


@pytest.mark.parametrize("case", list(REMOTE))
def test_remote_code_export_matches_ours(tmp_path, sp_flags, case):
    ckpt = train(tmp_path, "ckpt", REMOTE[case], sp_flags)
    out = str(tmp_path / "hf")
    assert "trust_remote_code" in _export(ckpt, out)
    check_export(ckpt, out, "MegatronGPTForCausalLM", remote=True)


def test_qwen3_imports_back_with_plain_gains(tmp_path, sp_flags):
    """Qwen3 -> Megatron (TP2 x PP2): --qk-layernorm set, --apply-layernorm-1p not; every
    gain is 1 + the original zero-centred one, every other tensor the original."""
    ckpt = train(tmp_path, "ckpt", NATIVE["qwen3-gqa-1p"][0], sp_flags)
    hf, back = str(tmp_path / "hf"), str(tmp_path / "back")
    _export(ckpt, hf)
    code, printed = run_convert("--loader", "hf", "--saver", "megatron", "--load-dir", hf,
                                "--save-dir", back, "--target-tensor-parallel-size", "2",
                                "--target-pipeline-parallel-size", "2")
    assert code == 0, printed
    assert "greedy continuations of 32 tokens agree" in printed
    original, imported = ModelCheckpoint(ckpt), ModelCheckpoint(back)
    assert imported.args["qk_layernorm"] and not imported.args["apply_layernorm_1p"]
    assert original.names == imported.names
    assert "decoder.layers.1.self_attention.k_layernorm.weight" in imported.names
    vocab = imported.true_vocab_size
    for name in original.names:
        a, b = original.tensor(name), imported.tensor(name)
        if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
            a, b = a[:vocab], b[:vocab]
        if "layernorm" in name:
            a = a + 1
        assert torch.equal(a, b), name
    assert os.path.isfile(os.path.join(back, "latest_checkpointed_iteration.txt"))
