"""Training on tokenized files: the loss falls, resume continues with the next sample, and
bad data flags get one sentence."""

import os

import preprocess_data
import pytest

from tests.helpers import lm_losses, run_distributed, run_pretrain, validation_losses

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--lr", "3e-3", "--num-workers", "0", "--log-interval", "1", "--eval-interval", "4",
         "--eval-iters", "2", "--split", "90,8,2"]


@pytest.fixture(scope="module")
def tokenized(corpus, sp_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenized")
    assert preprocess_data.main(["--input", corpus, "--output-prefix", str(out / "docs"),
                                 "--tokenizer-type", "SentencePieceTokenizer",
                                 "--tokenizer-model", sp_model, "--append-eod",
                                 "--workers", "2"]) == 0
    return str(out / "docs_text_document"), ["--tokenizer-type", "SentencePieceTokenizer",
                                              "--tokenizer-model", sp_model]


def test_trains_on_tokenized_data(tokenized, tmp_path):
    prefix, tok = tokenized
    code, lines = run_pretrain(MODEL + tok + ["--data-path", prefix, "--train-iters", "30",
                                              "--norm-placement", "peri",
                                              "--data-cache-path", str(tmp_path)])
    assert code == 0, lines[-5:]
    losses = [float(v) for _, v in sorted(lm_losses(lines).items())]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_resume_continues_with_the_next_sample(tokenized, tmp_path):
    """Stopping at 5 and resuming gives the uninterrupted run's losses for 6..10: the data
    position (consumed samples) is restored along with everything else."""
    prefix, tok = tokenized
    run = MODEL + tok + ["--data-path", "0.4", prefix, "0.6", prefix, "--train-iters", "10",
                         "--data-cache-path", str(tmp_path / "cache")]
    code, straight = run_pretrain(run)
    assert code == 0
    ckpt = str(tmp_path / "ckpt")
    assert run_pretrain(run + ["--save", ckpt, "--exit-interval", "5"])[0] == 0
    code, resumed = run_pretrain(run + ["--load", ckpt])
    assert code == 0
    expected = lm_losses(straight)
    assert lm_losses(resumed) == {i: expected[i] for i in range(6, 11)}
    assert validation_losses(resumed) == validation_losses(straight)[1:]


def _losses_on_rank(argv):
    code, lines = run_pretrain(argv)
    return code, lm_losses(lines)


def test_two_ranks_share_the_index_cache(tokenized, tmp_path):
    """Rank 0 builds the cached indices while rank 1 waits, then both read them; the two
    data-parallel ranks print the one-process losses."""
    prefix, tok = tokenized
    run = MODEL + tok + ["--data-path", prefix, "--train-iters", "3", "--hidden-dropout", "0",
                         "--attention-dropout", "0"]
    code, lines = run_pretrain(run + ["--data-cache-path", str(tmp_path / "one")])
    assert code == 0
    results = run_distributed(_losses_on_rank, 2, run + ["--data-cache-path",
                                                         str(tmp_path / "two")])
    assert all(code == 0 for code, _ in results)
    # all-reduce vs accumulation order: equal to ~6 of the 7 printed digits
    for i, value in lm_losses(lines).items():
        assert float(results[1][1][i]) == pytest.approx(float(value), rel=1e-5)
    assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(tmp_path / "two"))


def test_per_split_paths(tokenized, tmp_path):
    prefix, tok = tokenized
    code, lines = run_pretrain(MODEL + tok + ["--train-data-path", prefix, "--valid-data-path",
                                              prefix, "--train-iters", "4",
                                              "--data-cache-path", str(tmp_path)])
    assert code == 0 and len(validation_losses(lines)) == 2  # at 4 and at the end


def one_error(lines):
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.mark.parametrize("data,message", [
    (["--data-path", "/nowhere/docs"], "dataset prefix /nowhere/docs has no /nowhere/docs.idx "
                                       "or /nowhere/docs.bin"),
    (["--data-path", "0.5", "PREFIX", "0"], "weight/prefix pairs"),
    (["--data-path", "0", "PREFIX", "0", "PREFIX"], "weights sum to zero"),
    (["--data-path", "PREFIX", "--mock-data"], "choose one source of data"),
    (["--data-path", "PREFIX", "--split", "a,b"], "--split a,b is not a comma-separated"),
    (["--valid-data-path", "PREFIX"], "without --train-data-path"),
])
def test_bad_data_flags(tokenized, data, message):
    prefix, tok = tokenized
    data = [prefix if w == "PREFIX" else w for w in data]
    code, lines = run_pretrain(MODEL + tok + data + ["--train-iters", "2"])
    assert code == 2 and message in one_error(lines)


def test_damaged_index_is_named(tokenized, tmp_path):
    import shutil
    prefix, tok = tokenized
    copy = str(tmp_path / "copy")
    shutil.copy(prefix + ".bin", copy + ".bin")
    with open(prefix + ".idx", "rb") as f:
        data = f.read()
    with open(copy + ".idx", "wb") as f:
        f.write(b"NOTMEGA!!" + data[9:])
    code, lines = run_pretrain(MODEL + tok + ["--data-path", copy, "--train-iters", "2"])
    assert code == 2 and f"{copy}.idx is not a Megatron index file" in one_error(lines)
