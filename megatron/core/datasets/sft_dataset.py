"""Supervised fine-tuning samples: packing of several conversations (tokenized by
megatron/core/datasets/conversations.py) into one sequence.

Conversations (in a seeded order) fill sequences of ``seq_length`` positions one after
another; one that does not fit starts the next sequence, and the rest of a sequence is
padding (no loss). Inside a sequence each conversation attends only to itself (a block-
diagonal causal mask) and its positions start again at 0, so a packed conversation gets
exactly the loss it would get alone. A conversation longer than the sequence is truncated
(``overlong="truncate"``) or skipped; both are counted.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron.core.datasets.conversations import (
    LOSS_MASK_SUFFIX,
    SFTDataError,
    read_conversations,
    tokenize_conversation,
)
from megatron.core.datasets.gpt_dataset import document_attention_mask


# ------------------------------------------------------------------ packing
@dataclass
class PackingStats:
    conversations: int = 0
    truncated: int = 0
    skipped: int = 0
    sequences: int = 0
    tokens: int = 0  # positions holding a conversation's token (the rest are padding)
    files: List[str] = field(default_factory=list)

    def line(self, split: str, seq_length: int) -> str:
        fill = self.tokens / max(1, self.sequences * seq_length)
        return (f" > SFT {split}: {self.conversations} conversations from "
                f"{', '.join(self.files)} packed into {self.sequences} sequences of "
                f"{seq_length} ({fill:.1%} filled); {self.truncated} truncated and "
                f"{self.skipped} skipped for being longer than the sequence")


def pack(lengths: Sequence[int], seq_length: int) -> List[List[int]]:
    """Greedy packing in the given order: indices of conversations (``lengths`` are their
    positions, tokens - 1, each at most ``seq_length``) per sequence."""
    packs, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > seq_length:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def packed_attention_mask(segment: np.ndarray,
                          branch: Optional[np.ndarray] = None) -> torch.Tensor:
    """Megatron's boolean attention mask [1, s, s] (True = masked) of a packed sequence:
    position i attends to positions j <= i of its own segment (``segment``: an id per
    position); with ``branch`` (0: the segment's shared part, k > 0: its k-th branch), only
    to j in the shared part or in i's own branch (tools/evaluation/scoring.py's choices
    sharing one context)."""
    masked = document_attention_mask(torch.from_numpy(np.asarray(segment))[None])[0]
    if branch is not None:
        b = torch.from_numpy(np.asarray(branch))
        masked |= ~((b[None, :] == 0) | (b[:, None] == b[None, :]))
    return masked


class SFTDataset(torch.utils.data.Dataset):
    """Packed conversations as Megatron samples: ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids`` [s] and ``attention_mask`` [1, s, s] (True = masked), or with
    ``document_ids`` each token's conversation number [s] instead (context parallelism).

    ``conversations``: (tokens, loss mask) pairs. ``num_samples``: the length asked for; the
    packed sequences are repeated in a new seeded order each epoch."""

    def __init__(self, conversations: Sequence[Tuple[np.ndarray, np.ndarray]], seq_length: int,
                 num_samples: Optional[int], seed: int, pad: int = 0,
                 overlong: str = "truncate", stats: Optional[PackingStats] = None,
                 document_ids: bool = False):
        self.seq_length, self.seed = seq_length, seed
        self.document_ids = document_ids
        self.pad = pad if pad >= 0 else 0
        stats = stats if stats is not None else PackingStats()
        kept = []
        for tokens, mask in conversations:
            stats.conversations += 1
            if len(tokens) - 1 > seq_length:
                if overlong == "skip":
                    stats.skipped += 1
                    continue
                tokens, mask = tokens[:seq_length + 1], mask[:seq_length + 1]
                if not mask[1:].any():  # nothing of the answer is left
                    stats.skipped += 1
                    continue
                stats.truncated += 1
            if len(tokens) < 2 or not mask[1:].any():
                stats.skipped += 1
                continue
            kept.append((tokens, mask))
        order = np.random.default_rng(seed).permutation(len(kept))
        self.conversations = [kept[i] for i in order]
        self.packs = pack([len(t) - 1 for t, _ in self.conversations], seq_length)
        stats.sequences = len(self.packs)
        stats.tokens = sum(len(t) - 1 for t, _ in self.conversations)
        self.stats = stats
        self.num_samples = len(self.packs) if num_samples is None else num_samples
        self._epochs: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _pack_of(self, idx: int) -> List[int]:
        n = len(self.packs)
        epoch = idx // n
        if epoch not in self._epochs:
            self._epochs[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        return self.packs[int(self._epochs[epoch][idx % n])]

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        if not self.packs:
            raise IndexError("no conversation fits the sequence length")
        s = self.seq_length
        tokens = np.full(s, self.pad, dtype=np.int64)
        labels = np.full(s, self.pad, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        positions = np.zeros(s, dtype=np.int64)
        segment = np.full(s, -1, dtype=np.int64)
        at = 0
        for k, c in enumerate(self._pack_of(idx)):
            t, m = self.conversations[c]
            n = len(t) - 1
            tokens[at:at + n], labels[at:at + n] = t[:-1], t[1:]
            loss_mask[at:at + n] = m[1:]
            positions[at:at + n] = np.arange(n)
            segment[at:at + n] = k
            at += n
        positions[at:] = np.arange(s - at)  # padding: its own block, never in the loss
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask),
                "position_ids": torch.from_numpy(positions),
                **({"document_ids": torch.from_numpy(segment)} if self.document_ids
                   else {"attention_mask": packed_attention_mask(segment)})}


def open_tokenized(path: str, check_only: bool = False):
    """The (tokens, loss mask) of every conversation of ``path``: a JSONL file (tokenized
    later), or a tools/preprocess_data.py --chat prefix whose loss mask lies beside it.
    Returns (kind, items): ("jsonl", conversations) or ("indexed", [(tokens, mask), ...]).
    ``check_only``: read every JSONL line, but of indexed files only their headers (items
    None). Raises SFTDataError naming the file (and line)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    if os.path.isfile(path):
        return "jsonl", read_conversations(path)
    mask_prefix = path + LOSS_MASK_SUFFIX
    if not IndexedDataset.exists(path):
        raise SFTDataError(f"{path}: neither a JSONL file nor a tools/preprocess_data.py "
                           "--chat dataset (no such file, no .bin/.idx pair)")
    if not IndexedDataset.exists(mask_prefix):
        raise SFTDataError(f"{path}: its loss mask {mask_prefix}.{{bin,idx}} is missing "
                           "(write both with tools/preprocess_data.py --chat)")
    tokens, masks = IndexedDataset(path), IndexedDataset(mask_prefix)
    if not np.array_equal(tokens.sequence_lengths, masks.sequence_lengths):
        raise SFTDataError(f"{path}: the tokens and {mask_prefix} differ in their "
                           "conversations' lengths; write both again with --chat")
    if check_only:
        return "indexed", None
    return "indexed", list(zip(tokens[0:len(tokens)], masks[0:len(masks)]))


def build_sft_datasets(tokenizer, seq_length: int, sizes: Sequence[Optional[int]], seed: int,
                       files: Optional[Sequence[str]] = None,
                       split: Optional[Sequence[float]] = None,
                       files_per_split: Optional[Sequence[Optional[Sequence[str]]]] = None,
                       overlong: str = "truncate", document_ids: bool = False):
    """Train, validation and test SFTDatasets (None where a split has no data): ``files``
    divided by ``split`` (Megatron's --split, over conversations in file order), or
    ``files_per_split`` (a held-out file per split). Returns (datasets, stats per split)."""
    from megatron.core.datasets.utils import get_split_indices
    def tokenized(path):
        kind, items = open_tokenized(path)
        return items if kind == "indexed" else \
            [tokenize_conversation(tokenizer, m) for m in items]

    if files_per_split is not None:
        parts = [[c for f in (paths or []) for c in tokenized(f)] if sizes[i] else []
                 for i, paths in enumerate(files_per_split)]
        names = [list(paths or []) for paths in files_per_split]
    else:
        conversations = [c for f in files for c in tokenized(f)]
        bounds = get_split_indices(list(split), len(conversations))
        parts = [conversations[bounds[i]:bounds[i + 1]] for i in range(3)]
        names = [list(files)] * 3
    datasets, stats = [], []
    for i, part in enumerate(parts):
        if not part or not sizes[i]:
            datasets.append(None)
            stats.append(None)
            continue
        st = PackingStats(files=names[i])
        datasets.append(SFTDataset(part, seq_length, sizes[i], seed + i,
                                   pad=tokenizer.pad, overlong=overlong, stats=st,
                                   document_ids=document_ids))
        if not datasets[-1].packs:
            raise SFTDataError(f"{', '.join(names[i])}: no conversation left to train on "
                               f"({st.skipped} longer than --seq-length {seq_length} skipped)")
        stats.append(st)
    return datasets, stats
