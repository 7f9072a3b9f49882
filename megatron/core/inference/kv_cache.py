"""The key/value cache that generation passes through the model as ``inference_context``."""

from typing import Dict, Optional, Tuple

import torch


class InferenceContext:
    """Keys and values of the tokens seen so far, per layer, for up to ``max_batch_size``
    sequences of ``max_sequence_length`` tokens (Megatron's static inference context).

    Each attention layer, found by its global ``layer_number``, keeps a key and a value
    tensor [max_batch_size, query groups on this rank, max_sequence_length, head dim],
    allocated at the full size on its first call (with the dtype and device of its keys).
    A forward with this context treats its s new tokens as positions
    ``sequence_len_offset .. sequence_len_offset + s - 1`` of every row; the caller advances
    the offset afterwards with :meth:`increment_sequence_len_offset`.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int):
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(f"max_batch_size={max_batch_size} and max_sequence_length="
                             f"{max_sequence_length} must both be at least 1.")
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0
        self.key_value_memory_dict: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def increment_sequence_len_offset(self, increment: int) -> None:
        """The tokens of the last forward are now part of the context."""
        self.sequence_len_offset += increment

    def reset(self) -> None:
        """Start new sequences (the memory is kept and overwritten)."""
        self.sequence_len_offset = 0

    def append_key_value(self, layer_number: int, key: torch.Tensor,
                         value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``key`` and ``value`` [b, groups, s, d] at positions offset .. offset
        + s - 1 of layer ``layer_number``; return the keys and values of positions 0 ..
        offset + s - 1, [b, groups, offset + s, d] (views of the memory)."""
        b, groups, s, d = key.shape
        start, end = self.sequence_len_offset, self.sequence_len_offset + s
        if b > self.max_batch_size or end > self.max_sequence_length:
            raise ValueError(f"the inference context holds {self.max_batch_size} sequences of "
                             f"{self.max_sequence_length} tokens; a batch of {b} reaching "
                             f"position {end} does not fit.")
        if layer_number not in self.key_value_memory_dict:
            shape = (self.max_batch_size, groups, self.max_sequence_length, d)
            self.key_value_memory_dict[layer_number] = (
                torch.empty(shape, dtype=key.dtype, device=key.device),
                torch.empty(shape, dtype=value.dtype, device=value.device))
        keys, values = self.key_value_memory_dict[layer_number]
        keys[:b, :, start:end] = key
        values[:b, :, start:end] = value
        return keys[:b, :, :end], values[:b, :, :end]

    def causal_mask(self, s: int, device: torch.device) -> Optional[torch.Tensor]:
        """Boolean [s, offset + s], True where new token i may attend to cached position j
        (j <= offset + i); None when every query may see every key (a single new token)."""
        if s == 1:
            return None
        offset = self.sequence_len_offset
        query = torch.arange(offset, offset + s, device=device)[:, None]
        return torch.arange(offset + s, device=device)[None, :] <= query
