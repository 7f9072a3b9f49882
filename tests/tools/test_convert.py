"""tools/checkpoint/convert.py: Hugging Face export (native classes and our modeling file),
import, re-layout, and the errors a user sees.

Checkpoints come from real (short) training runs; their weights are then redrawn with a large
spread so that logits span several units and greedy choices are decided by wide margins (a
model two steps from its 0.02-std initialization has near-uniform logits, where a 1e-7
rounding difference could flip an argmax).
"""

import contextlib
import io
import json
import os

import pytest
import torch

from tests.helpers import REPO, run_distributed, run_pretrain

pytest.importorskip("transformers", reason="conversion to Hugging Face needs transformers")
pytest.importorskip("safetensors", reason="conversion to Hugging Face needs safetensors")

import sys  # noqa: E402

sys.path[:0] = [os.path.join(REPO, "tools", "checkpoint"), os.path.join(REPO, "tools")]
import convert  # noqa: E402

from megatron.training.checkpoint_layout import ModelCheckpoint  # noqa: E402

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "128", "--mock-data",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
        "--lr", "1e-3", "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0",
        "--hidden-dropout", "0", "--attention-dropout", "0"]
LLAMA = ["--norm-placement", "pre", "--normalization", "RMSNorm", "--swiglu",
         "--position-embedding-type", "rope"]
GLM4 = ["--norm-placement", "peri", "--normalization", "RMSNorm", "--swiglu",
        "--position-embedding-type", "rope", "--disable-bias-linear"]
GQA = ["--group-query-attention", "--num-query-groups", "2"]


def run_convert(*argv):
    """(exit code, stdout + stderr) of convert.py's main in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = convert.main(["--model-type", "GPT", *argv])
    return code, out.getvalue()


def spread_weights(ckpt: str, seed: int = 0) -> None:
    """Redraw every weight of every file of the checkpoint: gains near 1, the rest N(0, s)
    with s chosen so activations neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    for root, _, files in os.walk(ckpt):
        for name in files:
            if name != "model_optim_rng.pt":
                continue
            path = os.path.join(root, name)
            state = torch.load(path, weights_only=True)
            for key in [k for k in state if k.startswith("model")]:
                for pname, t in state[key].items():
                    noise = torch.randn(t.shape, generator=g)
                    if "layernorm" in pname or "embedding_norm" in pname:
                        value = 1.0 + 0.2 * noise if pname.endswith("weight") else 0.1 * noise
                    elif pname.endswith("bias"):
                        value = 0.1 * noise
                    else:
                        value = noise * (0.5 if "embeddings" in pname else
                                         1.0 / t.shape[-1] ** 0.5)
                    state[key][pname] = value.to(t.dtype)
            torch.save(state, path)


def train(tmp_path, name, flags, tokenizer):
    ckpt = str(tmp_path / name)
    code, lines = run_pretrain(BASE + tokenizer + flags + ["--save", ckpt])
    assert code == 0, lines[-5:]
    spread_weights(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def sp_flags(sp_model):
    return ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model]


def our_logits(ckpt, tokens):
    from hf_verify import our_model
    reader = ModelCheckpoint(ckpt)
    model = our_model(reader.args, reader.tensor)
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return model, model(tokens, positions)


def hf_greedy(model, prompt, steps):
    """transformers' generate, greedy, never stopping early (an empty eos list: None would be
    refilled from the model's generation config)."""
    import copy
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = []
    config.update(do_sample=False, max_new_tokens=steps)
    config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert out.shape[1] == len(prompt) + steps
    return out[0, len(prompt):].tolist()


def check_export(ckpt, out, expected_class, remote, sp_model=None, text=None):
    """The export loads from its directory alone; logits equal ours within 1e-4; 32 greedy
    tokens from our generation code equal transformers' generate."""
    import transformers

    from megatron.core.inference.text_generation import generate
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == [expected_class]
    assert ("auto_map" in config) == remote
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, trust_remote_code=remote, local_files_only=True).eval()
    assert type(model).__name__ == expected_class
    vocab = config["vocab_size"]
    if text is not None:
        from megatron.core.tokenizers import build_tokenizer
        ours_tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
        theirs_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
        prompt = ours_tok.tokenize(text)[:24]
        assert theirs_tok(text).input_ids == ours_tok.tokenize(text)
    else:
        prompt = torch.randint(0, vocab, (24,), generator=torch.Generator().manual_seed(1))
        prompt = prompt.tolist()
    tokens = torch.tensor([prompt])
    ours, logits = our_logits(ckpt, tokens)
    with torch.no_grad():
        theirs = model(input_ids=tokens).logits
    # fp32 on both sides, the same operations in another order (and Glm4's permuted RoPE
    # rows): differences are a few ulps of logits of size ~10, far below 1e-4.
    assert logits.abs().max() > 1.0
    assert (logits[..., :vocab] - theirs).abs().max() <= 1e-4
    mine = generate(ours, [prompt], 32, eod=None, vocab_size=vocab, greedy=True)[0]
    assert mine == hf_greedy(model, prompt, 32)


NATIVE = {
    "llama-gqa-untied-bias-base": (LLAMA + GQA + ["--untie-embeddings-and-output-weights",
                                                  "--rotary-base", "50000"], "LlamaForCausalLM"),
    "llama-tied-embnorm": (LLAMA + ["--disable-bias-linear", "--embedding-norm"],
                           "LlamaForCausalLM"),
    "glm4-gqa-tied-partial-rope": (GLM4 + GQA + ["--rotary-percent", "0.5"], "Glm4ForCausalLM"),
    "glm4-untied-embnorm": (GLM4 + ["--untie-embeddings-and-output-weights",
                                    "--embedding-norm"], "Glm4ForCausalLM"),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_native_export_matches_ours(tmp_path, sp_flags, sp_model, corpus, case):
    from tests.conftest import corpus_texts
    flags, expected = NATIVE[case]
    ckpt = train(tmp_path, "ckpt", flags, sp_flags)
    out = str(tmp_path / "hf")
    code, printed = run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                                "--save-dir", out)
    assert code == 0, printed
    assert "greedy continuations of 32 tokens agree" in printed
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    check_export(ckpt, out, expected, remote=False, sp_model=sp_model,
                 text=corpus_texts(corpus)[3])


# Every placement with each norm, through the modeling file (none of these is native), with
# the other features spread over them.
REMOTE = {
    "pre-layernorm-partial-rope": ["--norm-placement", "pre", "--position-embedding-type",
                                   "rope", "--rotary-percent", "0.5",
                                   "--untie-embeddings-and-output-weights"],
    "pre-rmsnorm-gelu-learned": ["--norm-placement", "pre", "--normalization", "RMSNorm"],
    "post-layernorm-gelu-learned": ["--norm-placement", "post"],
    "post-rmsnorm-swiglu-rope-gqa": ["--norm-placement", "post", "--normalization", "RMSNorm",
                                     "--swiglu", "--position-embedding-type", "rope"] + GQA,
    "mix-layernorm-embnorm": ["--norm-placement", "mix", "--num-layers", "4",
                              "--embedding-norm", "--disable-bias-linear"],
    "mix-rmsnorm-swiglu-rope": ["--norm-placement", "mix", "--num-layers", "3",
                                "--normalization", "RMSNorm", "--swiglu",
                                "--position-embedding-type", "rope"],
    "peri-layernorm-learned-embnorm": ["--norm-placement", "peri", "--embedding-norm"],
    "peri-rmsnorm-with-biases": GLM4[:-1] + GQA,
}


@pytest.mark.parametrize("case", list(REMOTE))
def test_remote_code_export_matches_ours(tmp_path, sp_flags, case):
    ckpt = train(tmp_path, "ckpt", REMOTE[case], sp_flags)
    out = str(tmp_path / "hf")
    code, printed = run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                                "--save-dir", out)
    assert code == 0, printed
    assert "trust_remote_code" in printed
    assert "modeling_megatron_gpt.py" in os.listdir(out)
    check_export(ckpt, out, "MegatronGPTForCausalLM", remote=True)


def _hf_tensors(directory):
    from safetensors_io import SafetensorsDirectory
    files = SafetensorsDirectory(directory)
    return {k: files.get(k) for k in files.keys()}


def test_export_import_round_trips_are_exact(tmp_path, sp_flags):
    """Megatron -> HF -> Megatron (at TP=2 x PP=2) gives the original tensors (on the
    tokenizer's rows of the vocabulary), and that checkpoint exports the same HF tensors."""
    ckpt = train(tmp_path, "ckpt", LLAMA + GQA + ["--untie-embeddings-and-output-weights"],
                 sp_flags)
    hf, back, again = (str(tmp_path / n) for n in ("hf", "back", "again"))
    assert run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                       "--save-dir", hf)[0] == 0
    code, printed = run_convert("--loader", "hf", "--saver", "megatron", "--load-dir", hf,
                                "--save-dir", back, "--target-tensor-parallel-size", "2",
                                "--target-pipeline-parallel-size", "2")
    assert code == 0, printed
    assert "greedy continuations of 32 tokens agree" in printed
    assert open(os.path.join(back, "latest_checkpointed_iteration.txt")).read() == "release"
    original, imported = ModelCheckpoint(ckpt), ModelCheckpoint(back)
    assert imported.args["tensor_model_parallel_size"] == 2
    assert imported.args["tokenizer_type"] == "HuggingFaceTokenizer"
    assert original.names == imported.names
    vocab = imported.true_vocab_size
    for name in original.names:
        a, b = original.tensor(name), imported.tensor(name)
        if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
            a, b = a[:vocab], b[:vocab]
        assert torch.equal(a, b), name
    assert run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", back,
                       "--save-dir", again)[0] == 0
    first, second = _hf_tensors(hf), _hf_tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def _train_parallel(run):
    return run_pretrain(run)[0]


def test_any_source_layout_exports_the_same_files(tmp_path, sp_flags):
    """A model trained at TP=2 x PP=2 with virtual stages and the distributed optimizer
    exports exactly what its TP=1 copy (made by the megatron saver) exports."""
    ckpt = str(tmp_path / "tp2pp2")
    run = BASE + sp_flags + GLM4 + ["--num-layers", "4", "--tensor-model-parallel-size", "2",
                                    "--pipeline-model-parallel-size", "2",
                                    "--num-layers-per-virtual-pipeline-stage", "1",
                                    "--use-distributed-optimizer", "--save", ckpt]
    assert run_distributed(_train_parallel, 4, run) == [0, 0, 0, 0]
    assert len(os.listdir(os.path.join(ckpt, "iter_0000002"))) == 4
    spread_weights(ckpt)
    one = str(tmp_path / "tp1")
    code, printed = run_convert("--loader", "megatron", "--saver", "megatron", "--load-dir",
                                ckpt, "--save-dir", one)
    assert code == 0, printed
    # 34 weights and, for each, Adam's two moments
    assert "all 102 tensors read back identical (weights and optimizer state)" in printed
    exports = []
    for source in (ckpt, one):
        out = str(tmp_path / f"hf_{os.path.basename(source)}")
        code, printed = run_convert("--loader", "megatron", "--saver", "hf", "--load-dir",
                                    source, "--save-dir", out)
        assert code == 0, printed
        exports.append(out)
    for name in os.listdir(exports[0]):
        a, b = (open(os.path.join(d, name), "rb").read() for d in exports)
        assert a == b, name


def test_sharded_export_and_import(tmp_path, sp_flags):
    import transformers
    ckpt = train(tmp_path, "ckpt", GLM4, sp_flags)
    out, back = str(tmp_path / "hf"), str(tmp_path / "back")
    code, printed = run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                                "--save-dir", out, "--max-shard-size", "100KB")
    assert code == 0, printed
    shards = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    assert len(shards) > 3 and "model.safetensors.index.json" in os.listdir(out)
    transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    code, printed = run_convert("--loader", "hf", "--saver", "megatron", "--load-dir", out,
                                "--save-dir", back)
    assert code == 0, printed


def _first_loss(run):
    from tests.helpers import lm_losses
    code, lines = run_pretrain(run)
    assert code == 0, lines[-5:]
    return lm_losses(lines)


def test_imported_model_continues_training_at_any_layout(tmp_path, sp_flags):
    """An imported Llama trains with just --load and --use-checkpoint-args; the first loss at
    TP=2 x PP=2 equals the one at TP=1 (fp32, dropout off: the same weights and batch)."""
    ckpt = train(tmp_path, "ckpt", LLAMA, sp_flags)
    hf = str(tmp_path / "hf")
    assert run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                       "--save-dir", hf)[0] == 0
    losses = []
    for tp, pp in ((1, 1), (2, 2)):
        dest = str(tmp_path / f"import_{tp}_{pp}")
        assert run_convert("--loader", "hf", "--saver", "megatron", "--load-dir", hf,
                           "--save-dir", dest, "--target-tensor-parallel-size", str(tp),
                           "--target-pipeline-parallel-size", str(pp))[0] == 0
        run = ["--use-checkpoint-args", "--load", dest, "--seq-length", "32", "--mock-data",
               "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
               "--lr", "1e-4", "--num-workers", "0", "--log-interval", "1",
               "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0",
               "--tensor-model-parallel-size", str(tp),
               "--pipeline-model-parallel-size", str(pp)]
        losses.append(run_distributed(_first_loss, tp * pp, run)[-1])
    assert sorted(losses[0]) == [1, 2]
    assert float(losses[1][1]) == pytest.approx(float(losses[0][1]), rel=1e-5)


def test_run_text_generation_matches_transformers_generate(tmp_path, sp_flags, sp_model,
                                                            corpus):
    """tools/run_text_generation.py on our checkpoint and transformers' generate on its
    export give the same 32 greedy tokens for a real text prompt, through each side's own
    tokenizer."""
    import run_text_generation
    import transformers

    from tests.conftest import corpus_texts
    ckpt = train(tmp_path, "ckpt", GLM4 + GQA, sp_flags)
    out = str(tmp_path / "hf")
    assert run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                       "--save-dir", out)[0] == 0
    prompt = " ".join(corpus_texts(corpus)[5].split()[:12])
    results = str(tmp_path / "results.jsonl")
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_text_generation.main(["--load", ckpt, "--prompt", prompt, "--greedy",
                                         "--ignore-eod", "--max-new-tokens", "32",
                                         "--output", results]) == 0
    ours = json.loads(open(results).read())["tokens"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert len(ours) == 32
    assert hf_greedy(model.eval(), tokenizer(prompt).input_ids, 32) == ours


def test_fp8_trained_checkpoint_exports_in_full_precision(tmp_path, sp_flags):
    """FP8 is how the model was trained, not part of it: the export is verified against our
    model computing in fp32 (an FP8 reference would differ from any exact model by ~4%)."""
    ckpt = str(tmp_path / "ckpt")
    code, lines = run_pretrain(BASE + sp_flags + GLM4 + ["--fp8-format", "hybrid",
                                                         "--save", ckpt])
    assert code == 0, lines[-3:]
    code, out = run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                            "--save-dir", str(tmp_path / "hf"))
    assert code == 0, out
    assert "greedy continuations of 32 tokens agree" in out
