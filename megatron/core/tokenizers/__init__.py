"""Tokenizers with Megatron-LM's interface: eod, pad, vocab_size, tokenize, detokenize.

Nothing here imports torch, so tokenizing tools start fast.
"""

import os

from megatron.core import ConfigError
from megatron.core.tokenizers.null import NullTokenizer

# The arguments that name a tokenizer and its files (flag names with underscores).
TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")
TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer")


def _need_file(value, name, tokenizer_type):
    if value is None:
        raise ConfigError(f"tokenizer_type={tokenizer_type} needs {name}.")
    if not os.path.exists(value):
        raise ConfigError(f"{name}={value} does not exist.")


def build_tokenizer(tokenizer_type: str, vocab_file: str = None, merge_file: str = None,
                    tokenizer_model: str = None, vocab_size: int = None):
    """The tokenizer named by ``tokenizer_type`` (``--tokenizer-type``)."""
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise ConfigError(f"vocab_size={vocab_size} must be a positive number of tokens "
                              "for tokenizer_type=NullTokenizer.")
        return NullTokenizer(vocab_size)
    if tokenizer_type == "GPT2BPETokenizer":
        _need_file(vocab_file, "vocab_file", tokenizer_type)
        _need_file(merge_file, "merge_file", tokenizer_type)
        from megatron.core.tokenizers.gpt2_bpe import GPT2BPETokenizer
        return _load(GPT2BPETokenizer, vocab_file, vocab_file, merge_file)
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        _need_file(tokenizer_model, "tokenizer_model", tokenizer_type)
        from megatron.core.tokenizers import sentencepiece as sp
        return _load(getattr(sp, tokenizer_type), tokenizer_model, tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        _need_file(tokenizer_model, "tokenizer_model", tokenizer_type)
        from megatron.core.tokenizers.huggingface import HuggingFaceTokenizer
        return _load(HuggingFaceTokenizer, tokenizer_model, tokenizer_model)
    raise ConfigError(f"tokenizer_type={tokenizer_type} is not known; expected one of "
                      f"{', '.join(TOKENIZER_TYPES)}.")


def build_tokenizer_from(values: dict, fallback: dict):
    """The tokenizer ``values`` name (TOKENIZER_ARGS; None = not given), each value not given
    taken from ``fallback`` (e.g. a checkpoint's stored arguments). Raises ConfigError."""
    chosen = {k: values.get(k) if values.get(k) is not None else fallback.get(k)
              for k in TOKENIZER_ARGS}
    if chosen["tokenizer_type"] is None:
        raise ConfigError("the checkpoint records no tokenizer; give tokenizer_type and its "
                          "files (tokenizer_model, or vocab_file and merge_file).")
    return build_tokenizer(chosen["tokenizer_type"], vocab_file=chosen["vocab_file"],
                           merge_file=chosen["merge_file"],
                           tokenizer_model=chosen["tokenizer_model"],
                           vocab_size=chosen["vocab_size"])


def _load(cls, path, *args):
    """Construct, turning a file that is there but unusable into one clear sentence."""
    try:
        return cls(*args)
    except ImportError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # a damaged or foreign file: name it
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load {cls.__name__} from {path}: {reason}") from None


def vocab_size_with_padding(vocab_size: int, make_vocab_size_divisible_by: int,
                            tensor_model_parallel_size: int) -> int:
    """Round the vocabulary up to a multiple of divisor x tensor-parallel size, as Megatron."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
