"""tools/run_text_generation.py end to end: checkpoints trained here (one process, and two
pipeline stages) generate the library's tokens, with python and with torchrun at TP=2, and
user errors stop with one line before any weight is loaded."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.core.inference import generate
from megatron.core.models.gpt import GPTModel
from megatron.training.checkpoint_layout import (
    ModelCheckpoint,
    config_from_args,
    load_model_weights,
    retarget_args,
)
from tests.helpers import REPO, TINY_MODEL, run_distributed, run_pretrain

TOOL = os.path.join(REPO, "tools", "run_text_generation.py")
TRAIN = TINY_MODEL + ["--train-iters", "4", "--hidden-dropout", "0", "--attention-dropout", "0",
                      "--group-query-attention", "--num-query-groups", "2"]
PROMPTS = ["1 2 3 4 5", "7 8", "40 41 42 43 44 45 46 47 48"]  # NullTokenizer: ids as text
EOD = 500  # NullTokenizer(500): ids 0..499, then eod


def _pretrain_on_rank(argv):
    return run_pretrain(argv)[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"one": Peri-LN + RoPE + SwiGLU saved by one process, "pp2": Mix-LN with learned
    positions saved by two pipeline stages}."""
    root = tmp_path_factory.mktemp("generation")
    one, pp2 = str(root / "one"), str(root / "pp2")
    code, lines = run_pretrain(TRAIN + ["--norm-placement", "peri", "--position-embedding-type",
                                        "rope", "--normalization", "RMSNorm", "--swiglu",
                                        "--save", one])
    assert code == 0, lines[-3:]
    codes = run_distributed(_pretrain_on_rank, 2, TRAIN + [
        "--norm-placement", "mix", "--pipeline-model-parallel-size", "2", "--save", pp2])
    assert codes == [0, 0]
    return {"one": one, "pp2": pp2}


def library_generate(load, prompts, max_new_tokens, **sampling):
    """What the library generates from the checkpoint in ``load``, on one process."""
    reader = ModelCheckpoint(load)
    args = retarget_args(reader.args)
    config = config_from_args(args, hidden_dropout=0.0, attention_dropout=0.0,
                              params_dtype=torch.float32)
    model = GPTModel(config, args["padded_vocab_size"])
    load_model_weights([model], reader.tensor)
    ids = [[int(t) for t in p.split()] for p in prompts]
    return generate(model, ids, max_new_tokens, eod=EOD, vocab_size=501, **sampling)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_python_and_torchrun_at_tp2_agree(checkpoints, tmp_path):
    """The two-stage checkpoint loads on one process and on two tensor-parallel ranks; both
    print and write the library's greedy tokens, printed once (global rank 0)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    flags = [TOOL, "--load", checkpoints["pp2"], "--max-new-tokens", "8", "--greedy",
             *[x for p in PROMPTS for x in ("--prompt", p)]]
    outputs = []
    for name, launcher in (("python", [sys.executable]),
                           ("torchrun", [sys.executable, "-m", "torch.distributed.run",
                                         "--nproc_per_node", "2"])):
        out = str(tmp_path / f"{name}.jsonl")
        extra = ["--tensor-model-parallel-size", "2"] if name == "torchrun" else []
        result = subprocess.run(launcher + flags + extra + ["--output", out],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.count("completion:") == len(PROMPTS), result.stdout
        outputs.append(read_jsonl(out))
    assert outputs[0] == outputs[1]
    expected = library_generate(checkpoints["pp2"], PROMPTS, 8, greedy=True)
    assert [r["tokens"] for r in outputs[0]] == expected
    assert [r["prompt"] for r in outputs[0]] == PROMPTS
    assert outputs[0][0]["completion"] == " ".join(str(t) for t in expected[0] if t != EOD)


def run_tool(argv, capsys):
    import run_text_generation
    try:
        code = run_text_generation.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prompts_files_sampling_and_no_cache(checkpoints, tmp_path, capsys):
    """JSONL ("prompt" and "text" keys) and plain prompt files; seeded top-k sampling gives
    the library's tokens, with and without the cache, in one micro-batch or several."""
    jsonl, text = tmp_path / "p.jsonl", tmp_path / "p.txt"
    jsonl.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n\n" +
                     json.dumps({"text": PROMPTS[1], "id": 3}) + "\n")
    text.write_text(PROMPTS[2] + "\n")
    sampling = ["--top-k", "5", "--temperature", "0.9", "--seed", "3", "--max-new-tokens", "6"]
    expected = library_generate(checkpoints["one"], PROMPTS, 6, top_k=5, temperature=0.9,
                                seed=3)
    for extra in ([], ["--no-kv-cache"]):
        out = str(tmp_path / "out.jsonl")
        code, stdout, err = run_tool(["--load", checkpoints["one"], "--prompts-file", str(jsonl),
                                      "--prompts-file", str(text), *sampling, *extra,
                                      "--output", out], capsys)
        assert code == 0, err
        assert [r["tokens"] for r in read_jsonl(out)] == expected
        assert f"[3/3] prompt: {PROMPTS[2]}" in stdout
    # greedy rows do not depend on the batch they are in; --prompt values come first
    batched = library_generate(checkpoints["one"], PROMPTS[2:] + PROMPTS[:2], 6, greedy=True)
    code, stdout, err = run_tool(["--load", checkpoints["one"], "--prompts-file", str(jsonl),
                                  "--prompt", PROMPTS[2], "--greedy", "--max-new-tokens", "6",
                                  "--micro-batch-size", "1", "--output", out], capsys)
    assert code == 0, err
    assert [r["tokens"] for r in read_jsonl(out)] == batched
    assert "micro-batch 3/3" in stdout


BAD = [
    (["--load", "{missing}"], "checkpoint directory .* does not exist"),
    (["--iteration", "7"], r"iter_0000007 does not exist \(iterations in .*: 4\)"),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/no/such.model"],
     "cannot build the tokenizer: --tokenizer-model /no/such.model does not exist"),
    (["--temperature", "0"], "--temperature 0.0 must be positive"),
    (["--top-p", "1.5"], r"--top-p 1.5 must be in \[0, 1\]"),
    (["--top-k", "-1"], "--top-k -1 must be at least 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
    (["--max-new-tokens", "40"], "plus --max-new-tokens 40 exceeds .* 32"),
    (["--tensor-model-parallel-size", "2"], "does not match the 1 process"),
    (["--pipeline-model-parallel-size", "2"], "runs without pipeline parallelism"),
    (["--prompt", "1 999"], "token id 999, outside the model's vocabulary of 501"),
    (["--prompts-file", "{bad_jsonl}"], r'p\.jsonl:2 has no "prompt" or "text" string'),
    (["--prompts-file", "{missing}"], "--prompts-file .* does not exist"),
    (["--output", "{missing}/out.jsonl"], "--output .* does not exist"),
    (["--top-k", "two"], "Argument --top-k/--top_k: invalid int value: 'two'"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[f[0] for f, _ in BAD])
def test_user_errors_stop_before_loading_weights(checkpoints, tmp_path, capsys, monkeypatch,
                                                 flags, message):
    import run_text_generation
    monkeypatch.setattr(run_text_generation, "load_model_weights",
                        lambda *a: pytest.fail("weights loaded despite a user error"))
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "1 2"}\n{"prompt_text": "3"}\n')
    flags = [f.format(missing=str(tmp_path / "missing"), bad_jsonl=bad) for f in flags]
    argv = ["--load", checkpoints["one"], "--prompt", "1 2 3", "--max-new-tokens", "4", *flags]
    code, _, err = run_tool(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_text_generation.py: error: "), err
    assert __import__("re").search(message, lines[0]), lines[0]


def test_heads_not_divisible_and_no_prompts(checkpoints, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is joined
    code, _, err = run_tool(["--load", checkpoints["one"], "--prompt", "1", "--max-new-tokens",
                             "2", "--tensor-model-parallel-size", "3"], capsys)
    assert code == 2 and "num_attention_heads=4 is not divisible by " \
        "--tensor-model-parallel-size 3" in err
    monkeypatch.delenv("WORLD_SIZE")
    code, _, err = run_tool(["--load", checkpoints["one"], "--max-new-tokens", "2"], capsys)
    assert code == 2 and "no prompts: pass --prompt" in err
