"""tools/checkpoint/hf_tokenizer.py: each of our tokenizers, written as Hugging Face files and
loaded back with AutoTokenizer, gives our ids and decodes to our text."""

import json
import math
import os
import sys

import pytest

from megatron.core.tokenizers import build_tokenizer
from megatron.core.tokenizers.gpt2_bpe import GPT2BPETokenizer
from tests.conftest import corpus_texts
from tests.helpers import REPO

pytest.importorskip("transformers", reason="needs transformers")
sys.path.insert(0, os.path.join(REPO, "tools", "checkpoint"))
from hf_tokenizer import save_hf_tokenizer  # noqa: E402

TRICKY = ["héllo wörld 日本語 🎉 tabs\t\tand   spaces\n\n  end", "it's we've I'll 123 4567 ...!!",
          "  leading spaces", "trailing  ", "<|endoftext|> as text", "", " ", "\n", "\t\t",
          "a\r\nb\rc\x0bd\x01e", "\u3000full\u00a0width ＡＢＣ１２３ ～ ﬁ ① ㍿",
          "ﾊﾟｿｺﾝ ｶﾞｷﾞ e\u0301 ｒ\u0302 한국어 \u1100\u1161", "🎉🎉 x 👍🏽 🇺🇸 ❤️",
          "x" * 40 + " " + "-" * 30, "*" * 15, "The problem:\n------------\n\nSuppose"]
MARKUP = "<s> </s> <unk> <pad> <0x41> <EOD>"  # plain text, but special tokens to Megatron's
# Texts only the ids are compared on: SentencePiece's decode of these does not give the text back
IDS_ONLY = ["\u2581x", " \u2581 x", "x \u2581", "\u2581"]


def export(tokenizer, tmp_path, config_json=None):
    """Save ``tokenizer`` to a fresh directory, load it back as a user would (no network)."""
    from transformers import AutoTokenizer
    directory = tmp_path / f"hf{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    ids = save_hf_tokenizer(tokenizer, str(directory))
    if config_json is not None:
        (directory / "config.json").write_text(json.dumps(config_json))
    hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    assert hf.is_fast and len(hf) == tokenizer.vocab_size == ids["vocab_size"]
    assert hf.eos_token_id == tokenizer.eod == ids["eos_token_id"] and ids["files"]
    assert (hf.bos_token_id, hf.pad_token_id) == (ids["bos_token_id"], ids["pad_token_id"])
    return hf, ids


def unigram_tie(sp, a, b) -> bool:
    """Two segmentations with the same score up to float32 rounding. SentencePiece sums path
    scores in float32, tokenizers in float64, so where segmentations tie (runs of one
    character: "-" + "---------" or "---------" + "-") they may pick different ones; 1e-5 is
    above float32's relative error over a document's sum (n additions of 6e-8 each)."""
    def score(ids):
        return sum(sp.get_score(i) for i in ids if i < sp.get_piece_size())
    return math.isclose(score(a), score(b), rel_tol=1e-5)


def assert_same(hf, ours, texts, ids_only=(), sp=None, decoded=40):
    """hf's ids are ours on every text (for a Unigram ``sp``: or tie with ours, on a few texts:
    "*" * 15 does with these models), and hf decodes our ids of the last ``decoded`` texts to
    our text."""
    texts, ids_only = list(texts), list(ids_only)
    ties = []
    for text, expected, found in zip(texts + ids_only, ours.tokenize_batch(texts + ids_only),
                                     hf(texts + ids_only).input_ids):
        if found != expected:
            assert sp is not None and unigram_tie(sp, found, expected), repr(text[:200])
            ties.append(text)
    assert len(ties) <= 2, f"{len(ties)} ties: {ties}"
    for text in texts[-decoded:]:
        ids = ours.tokenize(text)
        assert hf.decode(ids) == ours.detokenize(ids), repr(text[:200])


def train_sentencepiece(corpus, tmp_path, **options):
    import sentencepiece as spm
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_texts(corpus)), model_prefix=prefix, vocab_size=1000,
        character_coverage=1.0, num_threads=2, minloglevel=2, **options)
    return prefix + ".model"


def test_gpt_sentencepiece_bpe(corpus, sp_model, tmp_path):
    ours = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    hf, ids = export(ours, tmp_path)
    assert ids == {"vocab_size": 1000, "bos_token_id": 1, "eos_token_id": 2,
                   "pad_token_id": None, "files": True}
    assert_same(hf, ours, corpus_texts(corpus) + TRICKY + [MARKUP], IDS_ONLY)
    # Its control pieces are text inside text, as in ours; decoding shows them, as HF does
    assert hf("</s>").input_ids == ours.tokenize("</s>") != [ours.eod]
    assert hf.decode([ours.eod]) == "</s>"


@pytest.mark.parametrize("options", [
    dict(model_type="unigram"),
    dict(model_type="unigram", byte_fallback=True, normalization_rule_name="nmt_nfkc_cf"),
    dict(model_type="unigram", normalization_rule_name="identity", add_dummy_prefix=False),
    dict(model_type="unigram", remove_extra_whitespaces=False, pad_id=3),
    dict(model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False),
    dict(model_type="bpe", byte_fallback=True, user_defined_symbols=["<tool>", "def"]),
], ids=["unigram", "unigram-bytes-nfkc_cf", "unigram-identity", "unigram-spaces", "bpe-identity",
        "bpe-user-defined"])
def test_gpt_sentencepiece_variants(corpus, tmp_path, options):
    import sentencepiece as spm
    model = train_sentencepiece(corpus, tmp_path, **options)
    ours = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=model)
    hf, ids = export(ours, tmp_path)
    assert ids["pad_token_id"] == (3 if "pad_id" in options else None)
    texts = corpus_texts(corpus)[:40] + TRICKY + [MARKUP, "a <tool> b<tool>c define undef"]
    sp = spm.SentencePieceProcessor(model_file=model)
    assert_same(hf, ours, texts, IDS_ONLY, sp=sp if options["model_type"] == "unigram" else None)


def test_megatron_sentencepiece(corpus, sp_model, tmp_path):
    """Its special tokens are added tokens with our ids, found inside text as ours finds them;
    each chunk between them is encoded alone (its own dummy prefix)."""
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    hf, ids = export(ours, tmp_path)
    assert ids == {"vocab_size": 1005, "bos_token_id": 1, "eos_token_id": 1002,
                   "pad_token_id": 1004, "files": True}
    assert (hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (1000, 1001, 1003)
    with_specials = ["Open a file.<EOD>Open a file.", "<CLS> a <SEP>b<MASK>  <PAD><s>x</s>",
                     "<EOD><EOD>", "  <EOD>  ", "<unk> is text", "<EO<EOD>D>"]
    for text in with_specials:
        assert hf(text).input_ids == ours.tokenize(text), text
    assert_same(hf, ours, corpus_texts(corpus) + TRICKY, IDS_ONLY + with_specials + [MARKUP])


def test_megatron_sentencepiece_unigram_with_pad(corpus, tmp_path):
    import sentencepiece as spm
    model = train_sentencepiece(corpus, tmp_path, model_type="unigram", pad_id=3,
                                user_defined_symbols=["<EOD>"])
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    hf, ids = export(ours, tmp_path)
    # <EOD> and <pad> are the model's own pieces; <CLS> <SEP> <MASK> come after them
    assert ids == {"vocab_size": 1003, "bos_token_id": 1, "eos_token_id": 4,
                   "pad_token_id": 3, "files": True}
    sp = spm.SentencePieceProcessor(model_file=model)
    assert_same(hf, ours, corpus_texts(corpus)[:40] + TRICKY, [MARKUP, "x<EOD>y<pad> <MASK>"],
                sp=sp)


def test_megatron_sentencepiece_without_bos_and_eos(corpus, tmp_path):
    model = train_sentencepiece(corpus, tmp_path, model_type="bpe", bos_id=-1, eos_id=-1)
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    hf, ids = export(ours, tmp_path)
    # <CLS> <SEP> <EOD> <MASK> <PAD> <BOS> <EOS> after the model's 1,000 pieces
    assert ids == {"vocab_size": 1007, "bos_token_id": 1005, "eos_token_id": 1002,
                   "pad_token_id": 1004, "files": True}
    assert_same(hf, ours, corpus_texts(corpus)[:40] + TRICKY, [MARKUP, "<BOS>x<EOS><EOD>"])
    gpt = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=model)
    with pytest.raises(ValueError, match="no end-of-document token"):
        save_hf_tokenizer(gpt, str(tmp_path))


@pytest.mark.parametrize("use_rust", [True, False])
def test_gpt2_bpe(corpus, bpe_files, tmp_path, use_rust):
    vocab, merges, _ = bpe_files
    ours = GPT2BPETokenizer(vocab, merges, use_rust=use_rust)
    hf, ids = export(ours, tmp_path)
    assert ids == {"vocab_size": ours.vocab_size, "bos_token_id": None,
                   "eos_token_id": ours.eod, "pad_token_id": None, "files": True}
    # <|endoftext|> in text is text, as in ours (Megatron-LM's GPT-2 tokenizer)
    assert hf("<|endoftext|>").input_ids == ours.tokenize("<|endoftext|>") != [ours.eod]
    texts = corpus_texts(corpus)[:None if use_rust else 40] + TRICKY + [MARKUP]
    assert_same(hf, ours, texts, IDS_ONLY)


def test_hugging_face_tokenizer(corpus, bpe_files, tmp_path):
    _, _, directory = bpe_files
    for source, documents in ((directory, None), (f"{directory}/tokenizer.json", 40)):
        ours = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=source)
        hf, ids = export(ours, tmp_path)
        assert ids["eos_token_id"] == ours.eod and ids["bos_token_id"] is None
        assert_same(hf, ours, corpus_texts(corpus)[:documents] + TRICKY + [MARKUP], IDS_ONLY)


def test_export_loads_next_to_a_model_config(sp_model, bpe_files, tmp_path):
    """A model's config.json in the same directory (the model types tools/checkpoint writes)
    does not make AutoTokenizer swap our pipeline for its model type's tokenizer class."""
    vocab, merges, _ = bpe_files
    text = "Hello  world </s> <EOD> <|endoftext|> 🎉"
    configs = [{"model_type": "llama"}, {"model_type": "glm4"},
               {"model_type": "megatron_gpt_periln",
                "auto_map": {"AutoConfig": "modeling_megatron_gpt.MegatronGPTConfig"}}]
    for ours in (build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model),
                 build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)):
        for config in configs:
            hf, _ = export(ours, tmp_path, config_json=config)
            assert type(hf).__name__ == "TokenizersBackend", config
            assert hf(text).input_ids == ours.tokenize(text)


def test_null_tokenizer_writes_nothing(tmp_path):
    ours = build_tokenizer("NullTokenizer", vocab_size=100)
    assert save_hf_tokenizer(ours, str(tmp_path)) == {
        "vocab_size": 101, "bos_token_id": None, "eos_token_id": 100, "pad_token_id": None,
        "files": False}
    assert list(tmp_path.iterdir()) == []


def test_what_cannot_be_exported(corpus, sp_model, tmp_path):
    ours = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    with pytest.raises(ValueError, match="is not a directory"):
        save_hf_tokenizer(ours, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot export a dict"):
        save_hf_tokenizer({}, str(tmp_path))
    model = train_sentencepiece(corpus, tmp_path, model_type="word")
    word = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=model)
    with pytest.raises(ValueError, match="only BPE and Unigram"):
        save_hf_tokenizer(word, str(tmp_path))
