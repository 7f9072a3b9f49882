"""SentencePiece tokenizers, as Megatron-LM defines them.

``GPTSentencePieceTokenizer`` is the model as trained: eod is its ``</s>`` (eos) id.
``SentencePieceTokenizer`` adds Megatron's special tokens (<CLS>, <SEP>, <EOD>, <MASK>, and
pad/bos/eos pieces when the model lacks them) after the model's own ids, recognizes them in
text, and uses <EOD> as end of document.
"""

from typing import List


def _load(model_file: str):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=model_file)


class GPTSentencePieceTokenizer:
    def __init__(self, model_file: str):
        self.sp = _load(model_file)
        self.eod = self.sp.eos_id()
        self.pad = self.sp.pad_id()
        self.bos = self.sp.bos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def tokenize(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def tokenize_batch(self, texts: List[str]) -> List[List[int]]:
        return self.sp.encode(texts)

    def detokenize(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class SentencePieceTokenizer:
    def __init__(self, model_file: str, vocab_extra_ids: int = 0):
        self.sp = _load(model_file)
        self._vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        self.special_tokens = {}
        for token in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            self._add_special(token)
        for getter, fallback in ((self.sp.pad_id, "<PAD>"), (self.sp.bos_id, "<BOS>"),
                                 (self.sp.eos_id, "<EOS>")):
            i = getter()
            self._add_special(self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size()
                              else fallback)
        for i in range(vocab_extra_ids):
            self._add_special(f"<extra_id_{i}>")
        self._inv_special = {i: t for t, i in self.special_tokens.items()}
        self.eod = self._vocab["<EOD>"]
        pad_piece = self.sp.id_to_piece(self.sp.pad_id()) if self.sp.pad_id() >= 0 else "<PAD>"
        self.pad = self._vocab[pad_piece]

    def _add_special(self, token: str) -> None:
        if token not in self._vocab:
            self._vocab[token] = len(self._vocab)
        self.special_tokens[token] = self._vocab[token]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def tokenize(self, text: str) -> List[int]:
        """Plain text through SentencePiece; special tokens in the text map to their ids."""
        ids, start = [], 0
        while True:
            found = [(text.find(t, start), t) for t in self.special_tokens]
            found = [(i, t) for i, t in found if i >= 0]
            if not found:
                break
            i, token = min(found)
            ids.extend(self.sp.encode(text[start:i]))
            ids.append(self.special_tokens[token])
            start = i + len(token)
        ids.extend(self.sp.encode(text[start:]))
        return ids

    def tokenize_batch(self, texts: List[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids) -> str:
        text, last = "", 0
        ids = [int(i) for i in ids]
        for i, token_id in enumerate(ids):
            if token_id in self._inv_special:
                text += self.sp.decode(ids[last:i]) + " " + self._inv_special[token_id] + " "
                last = i + 1
        return text + self.sp.decode(ids[last:])
