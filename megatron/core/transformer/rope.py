"""Rotary position embeddings (non-interleaved: channel i pairs with channel i + d/2)."""

from typing import Tuple

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos and sin of the rotation angles for positions 0..s-1, each [s, 1, 1, rotary_dim], fp32."""

    def __init__(self, kv_channels: int, rotary_percent: float = 1.0, rotary_base: int = 10000):
        super().__init__()
        dim = int(kv_channels * rotary_percent)
        dim -= dim % 2
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache = None

    def forward(self, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        cache = self._cache
        if cache is None or cache[0].shape[0] < seq_len or cache[0].device != self.inv_freq.device:
            positions = torch.arange(seq_len, dtype=torch.float32, device=self.inv_freq.device)
            freqs = torch.outer(positions, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
            cache = self._cache = (emb.cos(), emb.sin())
        return cache[0][:seq_len], cache[1][:seq_len]

    def at(self, position_ids: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each token's own position: position_ids [b, s] (each below
        ``seq_len``) -> [s, b, 1, dim]."""
        cos, sin = self(seq_len)
        index = position_ids.t().to(cos.device)
        return cos[:, 0, 0][index].unsqueeze(2), sin[:, 0, 0][index].unsqueeze(2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(t: torch.Tensor,
                         rotary: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the first rotary_dim channels of t [s, b, heads, head_dim]."""
    cos, sin = (r.to(t.dtype) for r in rotary)
    rot_dim = cos.shape[-1]
    if rot_dim == t.shape[-1]:
        return t * cos + _rotate_half(t) * sin
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    return torch.cat((t_rot * cos + _rotate_half(t_rot) * sin, t_pass), dim=-1)
