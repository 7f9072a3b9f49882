"""A Hugging Face tokenizer from a local directory or a tokenizer.json file."""

import json
import os
from typing import List


class HuggingFaceTokenizer:
    """``--tokenizer-type HuggingFaceTokenizer --tokenizer-model <dir or tokenizer.json>``.

    ``tokenize`` is the tokenizer's own encoding (special tokens such as BOS included, as
    Megatron-LM does); ``eod`` is its eos token.
    """

    def __init__(self, path: str):
        try:
            import transformers
        except ImportError:
            raise ImportError("HuggingFaceTokenizer needs the transformers package: "
                              "pip install -e '.[hf]'") from None
        transformers.logging.set_verbosity_error()
        if os.path.isdir(path):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:
            self.tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
            config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
            if self.tokenizer.eos_token is None and os.path.isfile(config):
                with open(config, encoding="utf-8") as f:
                    eos = json.load(f).get("eos_token")
                if isinstance(eos, dict):
                    eos = eos.get("content")
                if eos:
                    self.tokenizer.eos_token = eos
        self.eod = self.tokenizer.eos_token_id
        if self.eod is None:
            raise ValueError(f"the tokenizer at {path} has no eos token to end documents with")
        pad = self.tokenizer.pad_token_id
        self.pad = -1 if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer(text).input_ids

    def tokenize_batch(self, texts: List[str]) -> List[List[int]]:
        return self.tokenizer(texts).input_ids

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])
