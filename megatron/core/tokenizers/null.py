"""NullTokenizer: text is space-separated integer ids (for --mock-data and pre-tokenized data)."""

from typing import List


class NullTokenizer:
    """Ids 0 .. vocab_size - 1 are ordinary tokens; the end-of-document token is ``vocab_size``,
    so ``vocab_size`` (the property) is one more than the number given, as in Megatron-LM."""

    def __init__(self, vocab_size: int):
        self._vocab_size_without_eod = int(vocab_size)
        self.eod = self._vocab_size_without_eod
        self.pad = -1  # no padding token

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    def tokenize(self, text: str) -> List[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(x)) for x in ids)
