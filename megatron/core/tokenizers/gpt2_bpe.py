"""GPT-2's byte-level BPE from vocab.json + merges.txt.

Two implementations give the same ids: Hugging Face's Rust ``tokenizers`` (used when it is
installed: an order of magnitude faster) and a pure-Python one on ``regex`` (GPT-2's
original algorithm), which is the reference.
"""

import json
from functools import lru_cache
from typing import Dict, List, Tuple

import regex

GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOD_TOKEN = "<|endoftext|>"


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's map from every byte to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def read_merges(merge_file: str) -> List[Tuple[str, str]]:
    with open(merge_file, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split()) for line in lines if line.strip()]


class PythonByteLevelBPE:
    """The reference implementation (GPT-2's encoder.py algorithm)."""

    def __init__(self, vocab: Dict[str, int], merges: List[Tuple[str, str]]):
        self.encoder = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.decoder = {i: t for t, i in vocab.items()}
        self.pattern = regex.compile(GPT2_PATTERN)
        self.cache: Dict[str, List[int]] = {}

    def _bpe(self, word: str) -> List[str]:
        """Merge the lowest-ranked adjacent pair, everywhere it occurs, until none is left."""
        parts = list(word)
        while len(parts) > 1:
            first, second = min(zip(parts, parts[1:]),
                                key=lambda pair: self.ranks.get(pair, float("inf")))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> List[int]:
        ids = []
        for piece in self.pattern.findall(text):
            cached = self.cache.get(piece)
            if cached is None:
                word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                cached = [self.encoder[t] for t in self._bpe(word)]
                if len(self.cache) < 100_000:
                    self.cache[piece] = cached
            ids.extend(cached)
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


def _rust_byte_level_bpe(vocab_file: str, merge_file: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class GPT2BPETokenizer:
    """``--tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt``.

    ``eod`` is ``<|endoftext|>``; there is no padding token (``pad`` = -1)."""

    def __init__(self, vocab_file: str, merge_file: str, use_rust: bool = True):
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab: Dict[str, int] = json.load(f)
        self._python = None
        self._rust = None
        if use_rust:
            try:
                self._rust = _rust_byte_level_bpe(vocab_file, merge_file)
            except ImportError:
                pass
        if self._rust is None:
            self._python = PythonByteLevelBPE(self.vocab, read_merges(merge_file))
        if EOD_TOKEN not in self.vocab:
            raise ValueError(f"{vocab_file} has no {EOD_TOKEN} token (needed as end of document)")
        self.eod = self.vocab[EOD_TOKEN]
        self.pad = -1

    @property
    def backend(self) -> str:
        return "tokenizers (Rust)" if self._rust is not None else "regex (Python)"

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> List[int]:
        if self._rust is not None:
            return self._rust.encode(text, add_special_tokens=False).ids
        return self._python.encode(text)

    def tokenize_batch(self, texts: List[str]) -> List[List[int]]:
        if self._rust is not None:
            return [e.ids for e in self._rust.encode_batch(texts, add_special_tokens=False)]
        return [self._python.encode(t) for t in texts]

    def detokenize(self, ids) -> str:
        if self._rust is not None:
            return self._rust.decode([int(i) for i in ids], skip_special_tokens=False)
        return self._python.decode(ids)
