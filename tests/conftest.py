"""Session fixtures: a small real corpus, tokenizers trained on it in seconds, and a
megatron-core environment for interoperability tests (created once, skipped if impossible)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """JSONL of ~120 standard-library modules' docstrings (no download)."""
    from make_sample_corpus import write_corpus
    path = str(tmp_path_factory.mktemp("corpus") / "docs.jsonl")
    write_corpus(path, max_documents=120)
    return path


def corpus_texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def sp_model(corpus, tmp_path_factory):
    """A 1,000-piece SentencePiece BPE model trained on the corpus."""
    import sentencepiece as spm
    prefix = str(tmp_path_factory.mktemp("sp") / "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_texts(corpus)), model_prefix=prefix, vocab_size=1000,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, num_threads=2,
        minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="session")
def bpe_files(corpus, tmp_path_factory):
    """GPT-2-style vocab.json + merges.txt (byte-level BPE, 2,000 tokens) and a
    Hugging Face tokenizer directory built from them."""
    tokenizers = pytest.importorskip("tokenizers", reason="needs the tokenizers package")
    out = tmp_path_factory.mktemp("bpe")
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus_texts(corpus), vocab_size=2000, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save_model(str(out))
    tok.save(str(out / "tokenizer.json"))
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return str(out / "vocab.json"), str(out / "merges.txt"), str(out)


@pytest.fixture(scope="session")
def mcore_python():
    """Python of a virtual environment holding pip's megatron-core 0.16.1 (it cannot share
    ours: both packages own megatron.core). Created once in .venv-mcore; skipped with the
    reason when it cannot be installed."""
    venv = os.path.join(REPO, ".venv-mcore")
    python = os.path.join(venv, "bin", "python")
    probe = [python, "-P", "-c", "import megatron.core.datasets.helpers"]

    def works():
        return os.path.exists(python) and \
            subprocess.run(probe, cwd="/", capture_output=True).returncode == 0
    if not works():
        steps = [[sys.executable, "-m", "venv", venv],
                 [python, "-m", "pip", "install", "-q", "torch==2.13.0", "megatron-core==0.16.1",
                  "packaging"]]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                pytest.skip(f"megatron-core 0.16.1 could not be installed: "
                            f"{result.stderr.strip().splitlines()[-1:]}")
        if not works():
            pytest.skip("megatron-core 0.16.1 installed but does not import")
    return python
