"""tools/preprocess_data.py and tools/merge_datasets.py on real files."""

import filecmp
import gzip
import json
import os
import subprocess
import sys

import merge_datasets
import numpy as np
import preprocess_data
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import build_tokenizer
from tests.conftest import corpus_texts
from tests.helpers import REPO


def run(*argv):
    return preprocess_data.main([str(a) for a in argv])


def sp_args(sp_model):
    return ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model]


def test_output_is_the_tokenized_documents(corpus, sp_model, tmp_path):
    prefix = tmp_path / "out"
    assert run("--input", corpus, "--output-prefix", prefix, *sp_args(sp_model),
               "--append-eod", "--workers", 2) == 0
    ds = IndexedDataset(f"{prefix}_text_document")
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    texts = corpus_texts(corpus)
    assert len(ds) == len(texts) and ds.dtype == np.uint16
    for i in (0, 17, len(texts) - 1):
        assert ds[i].tolist() == tok.tokenize(texts[i]) + [tok.eod]
    assert sorted(os.listdir(tmp_path)) == ["out_text_document.bin", "out_text_document.idx"]


def test_workers_and_partitions_do_not_change_the_output(corpus, sp_model, tmp_path):
    outputs = []
    for workers, partitions in ((1, 1), (2, 1), (2, 2), (3, 3)):
        prefix = tmp_path / f"w{workers}p{partitions}"
        assert run("--input", corpus, "--output-prefix", prefix, *sp_args(sp_model),
                   "--append-eod", "--workers", workers, "--partitions", partitions) == 0
        outputs.append(f"{prefix}_text_document")
    for other in outputs[1:]:
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(outputs[0] + ext, other + ext, shallow=False), other
    assert not any("partition" in name for name in os.listdir(tmp_path))


def test_gzip_and_plain_text_inputs(corpus, sp_model, tmp_path):
    texts = corpus_texts(corpus)[:20]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    with open(tmp_path / "c.txt", "w", encoding="utf-8") as f:
        f.writelines(t.replace("\n", " ") + "\n" for t in texts)
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    for name, expected in (("c.jsonl.gz", texts), ("c.txt", [t.replace("\n", " ")
                                                             for t in texts])):
        assert run("--input", tmp_path / name, "--output-prefix", tmp_path / name,
                   *sp_args(sp_model)) == 0
        ds = IndexedDataset(f"{tmp_path / name}_text_document")
        assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) for t in expected]


def write_lines(path, lines):
    with open(path, "wb") as f:
        f.write(b"".join(lines))


BAD_LINES = [
    (b"not json\n", "not valid JSON"),
    (b'{"txt": "wrong key"}\n', "no key 'text'"),
    (b'{"text": "caf\xe9"}\n', "not valid UTF-8"),
    (b'{"text": 5}\n', "key 'text' is int, not a string"),
    (b'["a list"]\n', "a JSON list, not an object"),
]


@pytest.mark.parametrize("bad,reason", BAD_LINES)
def test_bad_line_stops_with_file_and_line(sp_model, tmp_path, capsys, bad, reason):
    path = tmp_path / "in.jsonl"
    good = [json.dumps({"text": f"document {i}."}).encode() + b"\n" for i in range(150)]
    write_lines(path, good[:100] + [bad] + good[100:])
    assert run("--input", path, "--output-prefix", tmp_path / "out", *sp_args(sp_model),
               "--workers", 2) == 1
    err = capsys.readouterr().err
    assert f"{path}:101: {reason}" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # nothing that looks finished


def test_skip_invalid_and_empty_documents(sp_model, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": "A sentence here."}).encode() + b"\n"] * 5
    lines += [bad for bad, _ in BAD_LINES] + [b'{"text": ""}\n', b'{"text": "   "}\n']
    write_lines(path, lines)
    assert run("--input", path, "--output-prefix", tmp_path / "out", *sp_args(sp_model),
               "--skip-invalid", "--append-eod") == 0
    err = capsys.readouterr().err
    assert "done: 5 documents" in err and "skipped 5 invalid lines" in err
    assert f"{path}:6: not valid JSON" in err and "skipped 2 empty documents" in err
    assert len(IndexedDataset(f"{tmp_path / 'out'}_text_document")) == 5


def test_split_sentences_and_several_keys(sp_model, tmp_path):
    path = tmp_path / "in.jsonl"
    docs = [{"text": "First one. Second one! Third?", "title": "A title."},
            {"text": "Only sentence", "title": "Another."}]
    write_lines(path, [json.dumps(d).encode() + b"\n" for d in docs])
    assert run("--input", path, "--output-prefix", tmp_path / "o", *sp_args(sp_model),
               "--json-keys", "text", "title", "--split-sentences", "--append-eod") == 0
    text = IndexedDataset(f"{tmp_path / 'o'}_text_sentence")
    title = IndexedDataset(f"{tmp_path / 'o'}_title_sentence")
    assert text.document_indices.tolist() == [0, 3, 4] and len(title) == 2
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert text[1].tolist() == tok.tokenize("Second one!")
    assert text[2].tolist() == tok.tokenize("Third?") + [tok.eod]


def test_starts_without_torch(corpus, sp_model, tmp_path):
    """Tokenizing needs neither torch nor the model code (that is what makes it start fast)."""
    argv = ["preprocess_data.py", "--input", corpus, "--output-prefix", str(tmp_path / "o"),
            *sp_args(sp_model)]
    script = "\n".join([
        "import runpy, sys",
        f"sys.argv = {argv!r}",
        "try:",
        f"    runpy.run_path({os.path.join(REPO, 'tools', 'preprocess_data.py')!r}, "
        "run_name='__main__')",
        "except SystemExit as e:",
        "    assert e.code == 0, e",
        "assert 'torch' not in sys.modules, 'preprocess_data imported torch'"])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr


def test_merge_datasets(corpus, sp_model, tmp_path, capsys):
    parts = tmp_path / "parts"
    for name, texts in (("a", ["One doc."]), ("b", ["Two docs.", "Three docs."])):
        path = tmp_path / f"{name}.jsonl"
        write_lines(path, [json.dumps({"text": t}).encode() + b"\n" for t in texts])
        assert run("--input", path, "--output-prefix", parts / name, *sp_args(sp_model)) == 0
    assert merge_datasets.main(["--input", str(parts), "--output-prefix",
                                str(tmp_path / "all")]) == 0
    merged = IndexedDataset(str(tmp_path / "all"))
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert [merged[i].tolist() for i in range(3)] == [tok.tokenize(t) for t in
                                                      ("One doc.", "Two docs.", "Three docs.")]
    assert merged.document_indices.tolist() == [0, 1, 2, 3]


CHATS = [{"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "What is len?"},
                       {"role": "assistant", "content": "A count."},
                       {"role": "user", "content": "And max?"},
                       {"role": "assistant", "content": "The largest."}]},
         {"prompt": "Say hi.", "response": "Hi."}] * 40


def _chat_file(tmp_path, records, name="chat.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("workers, partitions", [(1, 1), (2, 2)])
def test_chat_mode_writes_tokens_and_loss_masks(sp_model, tmp_path, workers, partitions):
    from megatron.core.datasets.conversations import read_conversations, tokenize_conversation
    from megatron.core.datasets.sft_dataset import open_tokenized
    path = _chat_file(tmp_path, CHATS)
    prefix = tmp_path / "sft"
    assert run("--input", path, "--output-prefix", prefix, *sp_args(sp_model), "--chat",
               "--workers", workers, "--partitions", partitions) == 0
    assert sorted(os.listdir(tmp_path)) == [
        "chat.jsonl", "sft_conversations_document.bin", "sft_conversations_document.idx",
        "sft_conversations_document_loss_mask.bin", "sft_conversations_document_loss_mask.idx"]
    tok = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    kind, stored = open_tokenized(f"{prefix}_conversations_document")
    assert kind == "indexed" and len(stored) == len(CHATS)
    for (tokens, mask), messages in zip(stored, read_conversations(str(path))):
        expected_tokens, expected_mask = tokenize_conversation(tok, messages)
        assert tokens.tolist() == expected_tokens.tolist()
        assert mask.tolist() == expected_mask.tolist() and mask.dtype == np.uint8


def test_chat_mode_bad_conversation_stops_with_file_and_line(sp_model, tmp_path, capsys):
    path = _chat_file(tmp_path, CHATS[:3] + [{"messages": [{"role": "user", "content": "x"}]}])
    assert run("--input", path, "--output-prefix", tmp_path / "sft", *sp_args(sp_model),
               "--chat") == 1
    err = capsys.readouterr().err
    assert f"{path}:4: the conversation has no assistant turn" in err, err
    assert sorted(os.listdir(tmp_path)) == ["chat.jsonl"]  # nothing half-written
