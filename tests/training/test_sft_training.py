"""pretrain_gpt.py --sft: packed conversations train, under TP+SP, PP, DP and CP, with the loss
curve and validation losses of one process, resume exactly, and refuse bad data with one
sentence before anything is built."""

import json
import os
import random

import pytest

from tests.helpers import (
    assert_same_curves,
    lm_losses,
    one_process_curves,
    run_distributed,
    run_pretrain,
    train_layouts,
    validation_losses,
)

WORDS = ("the list of items returns a new sorted copy and len counts them while dict maps keys "
         "to values so that each call gives back one object").split()


def _sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def _write_conversations(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            if i % 3 == 0:
                record = {"prompt": _sentence(rng, 3, 8), "response": _sentence(rng, 2, 14)}
            else:
                messages = [{"role": "system", "content": "Be brief."}] if i % 2 else []
                for _ in range(rng.randint(1, 3)):
                    messages += [{"role": "user", "content": _sentence(rng, 2, 10)},
                                 {"role": "assistant", "content": _sentence(rng, 2, 16)}]
                record = {"messages": messages}
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def sft_run(sp_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train, valid = str(out / "train.jsonl"), str(out / "valid.jsonl")
    _write_conversations(train, 160, 0)
    _write_conversations(valid, 24, 1)
    return ["--sft", "--train-data-path", train, "--valid-data-path", valid,
            "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--max-position-embeddings", "64",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "8",
            "--lr", "3e-3", "--lr-warmup-iters", "2", "--num-workers", "0",
            "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "2",
            "--hidden-dropout", "0", "--attention-dropout", "0"]


PLACEMENTS = {"peri": ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
                       "--position-embedding-type", "rope"],
              "pre": ["--position-embedding-type", "learned_absolute"]}
LAYOUTS = {"TP=2+SP": (["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                       ("peri", "pre")),
           "PP=2": (["--pipeline-model-parallel-size", "2"], ("peri",)),
           "DP=2 distributed optimizer": (["--use-distributed-optimizer"], ("peri",)),
           "CP=2": (["--context-parallel-size", "2"], ("peri", "pre"))}


def test_packing_is_reported_and_loss_falls(sft_run):
    code, lines = run_pretrain(sft_run + PLACEMENTS["peri"] + ["--norm-placement", "peri",
                                                              "--train-iters", "24"])
    assert code == 0, lines[-5:]
    report = next(x for x in lines if x.startswith(" > SFT train: "))
    assert "160 conversations" in report and "0 skipped" in report, report
    assert any(x.startswith(" > SFT validation: 24 conversations") for x in lines)
    losses = [float(v) for _, v in sorted(lm_losses(lines).items())]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0, losses
    assert validation_losses(lines)


def test_parallel_layouts_match_one_process(sft_run):
    curves = one_process_curves(sft_run, PLACEMENTS)
    results = run_distributed(train_layouts, 2, sft_run, PLACEMENTS, LAYOUTS)[-1]
    assert_same_curves(results, curves, 8)


def test_resume_is_exact(sft_run, tmp_path):
    run = sft_run + PLACEMENTS["peri"] + ["--norm-placement", "peri"]
    code, whole = run_pretrain(run)
    assert code == 0
    save = ["--save", str(tmp_path), "--load", str(tmp_path), "--save-interval", "4"]
    code, _ = run_pretrain(run + save + ["--exit-interval", "4"])
    assert code == 0
    code, resumed = run_pretrain(run + save)
    assert code == 0
    expected = {i: v for i, v in lm_losses(whole).items() if i > 4}
    assert lm_losses(resumed) == expected
    assert validation_losses(resumed)[-1:] == validation_losses(whole)[-1:]


@pytest.mark.parametrize("line, problem", [
    ({"messages": [{"role": "user", "content": "hi"}]}, ":2: the conversation has no "
                                                         "assistant turn"),
    ({"messages": [{"role": "tool", "content": "x"}]}, ":2: message 0 has the unknown role"),
])
def test_bad_data_is_refused_before_building(sft_run, tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(line) +
                    "\n")
    run = list(sft_run)
    run[run.index("--train-data-path") + 1] = str(path)
    code, lines = run_pretrain(run)
    assert code == 2
    assert lines[-1].startswith("pretrain_gpt.py: error: --sft: ") or \
        "error: --sft: " in lines[-1], lines[-3:]
    assert f"{path}{problem}" in lines[-1], lines[-1]
    assert not any("building GPT model" in x for x in lines)


def test_no_text_tokenizer_or_mock_data(sft_run):
    code, lines = run_pretrain(sft_run + ["--mock-data"])
    assert code == 2 and "choose one source of data" in lines[-1]
    run = [x for x in sft_run]
    i = run.index("--tokenizer-type")
    run[i + 1] = "NullTokenizer"
    code, lines = run_pretrain(run + ["--vocab-size", "100"])
    assert code == 2 and "--sft needs a text tokenizer" in lines[-1], lines[-1]


def test_overlong_counted(sft_run):
    code, lines = run_pretrain(sft_run + ["--seq-length", "40", "--sft-overlong", "skip",
                                          "--train-iters", "1", "--eval-iters", "0"])
    assert code == 0, lines[-3:]
    report = next(x for x in lines if x.startswith(" > SFT train: "))
    skipped = int(report.split(" truncated and ")[1].split()[0])
    assert skipped > 0 and " 0 truncated" in report, report
    assert os.path.exists(sft_run[sft_run.index("--train-data-path") + 1])


def test_preprocessed_conversations_train_the_same(sft_run, tmp_path):
    """tools/preprocess_data.py --chat's files give the JSONL's losses exactly."""
    import preprocess_data
    run = sft_run + PLACEMENTS["peri"] + ["--norm-placement", "peri", "--train-iters", "4"]
    i = run.index("--train-data-path") + 1
    prefix = str(tmp_path / "train")
    tok = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
           run[run.index("--tokenizer-model") + 1]]
    assert preprocess_data.main(["--input", run[i], "--output-prefix", prefix, "--chat",
                                 *tok]) == 0
    code, from_jsonl = run_pretrain(run)
    assert code == 0
    run[i] = prefix + "_conversations_document"
    code, from_files = run_pretrain(run)
    assert code == 0
    assert lm_losses(from_files) == lm_losses(from_jsonl) and len(lm_losses(from_jsonl)) == 4
    run[i] = prefix + "_missing_document"
    code, lines = run_pretrain(run)
    assert code == 2 and "neither a JSONL file nor a tools/preprocess_data.py --chat" in \
        lines[-1], lines[-1]


def test_from_a_pretrained_checkpoint(sft_run, tmp_path):
    """--pretrained-checkpoint starts from its weights at iteration 0 (as --load --finetune
    does), and a fine-tuning run saved to --load resumes from there instead."""
    base = sft_run + PLACEMENTS["peri"] + ["--norm-placement", "peri"]
    pretrained = str(tmp_path / "pretrained")
    code, _ = run_pretrain(base + ["--train-iters", "3", "--save", pretrained])
    assert code == 0
    sft = base + ["--train-iters", "4", "--lr", "1e-3"]
    code, finetune = run_pretrain(sft + ["--load", pretrained, "--finetune"])
    assert code == 0
    ours = str(tmp_path / "sft")
    start = sft + ["--pretrained-checkpoint", pretrained, "--load", ours, "--save", ours,
                   "--use-checkpoint-args"]
    code, lines = run_pretrain(start + ["--exit-interval", "2"])
    assert code == 0, lines[-3:]
    assert any(f"loaded weights from {pretrained}" in x and "--pretrained-checkpoint" in x
               for x in lines), lines
    code, resumed = run_pretrain(start)  # --load now holds iteration 2: resume from there
    assert code == 0
    assert {**lm_losses(lines), **lm_losses(resumed)} == lm_losses(finetune)
    assert sorted(lm_losses(resumed)) == [3, 4]
