"""Train a tokenizer on a JSONL corpus, in seconds.

    python tools/train_tokenizer.py --input data/stdlib_docs.jsonl --output data/tok \\
        --type sentencepiece --vocab-size 4000      # -> data/tok.model
    python tools/train_tokenizer.py --input ... --output data/gpt2 --type gpt2bpe
                                                     # -> data/gpt2/vocab.json, merges.txt

sentencepiece: a BPE model with byte fallback (use --tokenizer-type GPTSentencePieceTokenizer
or SentencePieceTokenizer). gpt2bpe: GPT-2-style byte-level BPE files with <|endoftext|>
(--tokenizer-type GPT2BPETokenizer; needs the tokenizers package).
"""

import argparse
import json
import os
import sys


def texts(path: str, key: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)[key]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="model prefix (sentencepiece) or directory")
    p.add_argument("--type", choices=["sentencepiece", "gpt2bpe"], default="sentencepiece")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--json-key", default="text")
    a = p.parse_args(argv)
    if not os.path.isfile(a.input):
        p.error(f"--input {a.input} does not exist")
    if a.type == "sentencepiece":
        import sentencepiece as spm
        if os.path.dirname(a.output):
            os.makedirs(os.path.dirname(a.output), exist_ok=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=texts(a.input, a.json_key), model_prefix=a.output,
            vocab_size=a.vocab_size, model_type="bpe", character_coverage=1.0,
            byte_fallback=True, num_threads=os.cpu_count() or 1, minloglevel=2,
            max_sentence_length=1 << 20)
        print(f"wrote {a.output}.model", file=sys.stderr)
    else:
        from tokenizers import ByteLevelBPETokenizer
        os.makedirs(a.output, exist_ok=True)
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator(texts(a.input, a.json_key), vocab_size=a.vocab_size,
                                special_tokens=["<|endoftext|>"], show_progress=False)
        tok.save_model(a.output)
        print(f"wrote {a.output}/vocab.json and {a.output}/merges.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
