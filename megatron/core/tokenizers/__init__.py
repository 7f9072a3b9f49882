"""Tokenizers with Megatron-LM's interface: eod, pad, vocab_size, tokenize, detokenize."""

from megatron.core import ConfigError
from megatron.core.tokenizers.null import NullTokenizer

TOKENIZER_TYPES = ("NullTokenizer",)


def build_tokenizer(tokenizer_type: str, vocab_size: int = None):
    """The tokenizer named by ``tokenizer_type`` (``--tokenizer-type``)."""
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise ConfigError(f"vocab_size={vocab_size} must be a positive number of tokens "
                              "for tokenizer_type=NullTokenizer.")
        return NullTokenizer(vocab_size)
    raise ConfigError(f"tokenizer_type={tokenizer_type} is not supported yet; expected one of "
                      f"{', '.join(TOKENIZER_TYPES)}.")


def vocab_size_with_padding(vocab_size: int, make_vocab_size_divisible_by: int,
                            tensor_model_parallel_size: int) -> int:
    """Round the vocabulary up to a multiple of divisor x tensor-parallel size, as Megatron."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
