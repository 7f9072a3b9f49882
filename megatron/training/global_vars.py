"""The run's arguments and tokenizer, set once by initialize_megatron (Megatron's get_args)."""

_ARGS = None
_TOKENIZER = None


def get_args():
    if _ARGS is None:
        raise RuntimeError("arguments are not set: call initialize_megatron() first")
    return _ARGS


def set_args(args) -> None:
    global _ARGS
    _ARGS = args


def get_tokenizer():
    if _TOKENIZER is None:
        raise RuntimeError("tokenizer is not built: call initialize_megatron() first")
    return _TOKENIZER


def set_tokenizer(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer
