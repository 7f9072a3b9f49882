"""Tokenizers: ids, special tokens, and the errors a user sees for bad files."""

import pytest

from megatron.core import ConfigError
from megatron.core.tokenizers import build_tokenizer
from megatron.core.tokenizers.gpt2_bpe import GPT2BPETokenizer
from tests.conftest import corpus_texts

TRICKY = ["héllo wörld 日本語 🎉 tabs\t\tand   spaces\n\n  end", "it's we've I'll 123 4567 ...!!",
          "  leading spaces", "trailing  ", "<|endoftext|> as text", ""]


def test_gpt2_python_and_rust_give_the_same_ids(corpus, bpe_files):
    vocab, merges, _ = bpe_files
    rust = GPT2BPETokenizer(vocab, merges)
    python = GPT2BPETokenizer(vocab, merges, use_rust=False)
    assert rust.backend.startswith("tokenizers") and python.backend.startswith("regex")
    texts = corpus_texts(corpus)[:40] + TRICKY
    assert [python.tokenize(t) for t in texts] == rust.tokenize_batch(texts)
    for t in TRICKY:
        assert python.detokenize(python.tokenize(t)) == t == rust.detokenize(rust.tokenize(t))


def test_gpt2_matches_hugging_face_byte_level_bpe(corpus, bpe_files):
    """The reference (pure Python) ids equal Hugging Face's ByteLevelBPETokenizer's built
    from the same two files."""
    from tokenizers import ByteLevelBPETokenizer
    vocab, merges, _ = bpe_files
    hf = ByteLevelBPETokenizer(vocab, merges)
    ours = GPT2BPETokenizer(vocab, merges, use_rust=False)
    for text in corpus_texts(corpus)[40:80] + TRICKY:
        assert ours.tokenize(text) == hf.encode(text).ids
    assert ours.eod == hf.token_to_id("<|endoftext|>") and ours.pad == -1
    assert ours.vocab_size == hf.get_vocab_size()


def test_gpt_sentencepiece(sp_model):
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert tok.vocab_size == sp.get_piece_size() == 1000
    assert tok.eod == sp.eos_id() and tok.pad == sp.pad_id()
    text = "Return the sum of two numbers."
    assert tok.tokenize(text) == sp.encode(text)
    assert tok.detokenize(tok.tokenize(text)) == text


def test_megatron_sentencepiece_adds_special_tokens(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    # <CLS> <SEP> <EOD> <MASK> and <PAD> are new; <s> and </s> exist in the model
    assert tok.vocab_size == 1000 + 5
    assert tok.eod == 1002 and tok.pad == 1004
    plain = tok.tokenize("Open a file.")
    assert tok.tokenize("Open a file.<EOD>Open a file.") == plain + [tok.eod] + plain
    assert tok.detokenize(plain) == "Open a file."


def test_hugging_face_tokenizer(bpe_files):
    pytest.importorskip("transformers", reason="needs transformers")
    from tokenizers import Tokenizer
    _, _, directory = bpe_files
    reference = Tokenizer.from_file(f"{directory}/tokenizer.json")
    for source in (directory, f"{directory}/tokenizer.json"):
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=source)
        assert tok.eod == reference.token_to_id("<|endoftext|>")
        text = "Split the string at the first occurrence of sep."
        assert tok.tokenize(text) == reference.encode(text).ids
        assert tok.detokenize(tok.tokenize(text)) == text


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tok.vocab_size == 101 and tok.eod == 100
    assert tok.tokenize("5 6 7") == [5, 6, 7] and tok.detokenize([5, 6]) == "5 6"


def test_bad_tokenizer_files(tmp_path, sp_model):
    with pytest.raises(ConfigError, match="needs tokenizer_model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(ConfigError, match="vocab_file=/nope.json does not exist"):
        build_tokenizer("GPT2BPETokenizer", vocab_file="/nope.json", merge_file=sp_model)
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=f"cannot load GPTSentencePieceTokenizer from {broken}"):
        build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=str(broken))
