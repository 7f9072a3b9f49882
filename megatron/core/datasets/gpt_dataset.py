"""GPTDataset: fixed-length samples cut from a stream of shuffled documents.

The three indices are built as megatron-core builds them, so the same documents, split,
sequence length and seed give the same samples in the same order:

- document index: the split's document ids repeated once per epoch, shuffled (the last
  epoch shuffled on its own when it would be under 80% used);
- sample index: (position in the document index, offset in that document) where each sample
  starts; a sample holds seq_length + 1 tokens and shares its last token with the next;
- shuffle index: a permutation of the samples.

The sample index is computed vectorized in numpy (a cumulative sum and a search) instead of
megatron-core's compiled loop; the result is the same array.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from megatron.core.datasets.cache import cached_indices
from megatron.core.datasets.utils import DataError, Split


@dataclass
class GPTDatasetConfig:
    sequence_length: int
    """Tokens per sample fed to the model (each sample reads one more for the labels)."""
    random_seed: int = 1234
    """Seed of the document and sample shuffles."""
    eod: int = 0
    """End-of-document token id."""
    pad: int = -1
    """Padding token id; -1 when the tokenizer has none."""
    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token."""
    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens (builds a dense mask per sample)."""
    document_ids: bool = False
    """With reset_attention_mask: give each token's document number (``document_ids`` [s],
    see :func:`document_ids`) instead of the dense [1, s, s] mask -- s numbers instead of s^2,
    and a mask context parallelism can split."""
    eod_mask_loss: bool = False
    """Do not train on predicting the token after an end-of-document token."""
    drop_last_partial_validation_sequence: bool = True
    """Drop the valid split's last, partial sample (as megatron-core does by default)."""
    path_to_cache: Optional[str] = None
    """Where the indices are cached as .npy files (None: build in memory every time)."""


def build_document_index(documents: np.ndarray, num_epochs: int,
                         rng: np.random.RandomState, separate_final_epoch: bool) -> np.ndarray:
    """``documents`` repeated ``num_epochs`` times and shuffled, as int32."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, sequence_length: int,
                       num_epochs: int, tokens_per_epoch: int, drop_last_partial: bool = True,
                       add_extra_token: int = 1) -> np.ndarray:
    """[num_samples + 1, 2] array of (document-index position, token offset) sample starts.

    Sample j starts at token j * sequence_length of the flattened document stream. A start
    that falls on a document's last token stays in that document (offset = length - 1), as in
    megatron-core's helper.
    """
    usable = num_epochs * tokens_per_epoch - add_extra_token
    num_samples = usable // sequence_length if drop_last_partial \
        else math.ceil(usable / sequence_length)
    lengths = np.asarray(sizes, dtype=np.int64)[document_index]
    ends = np.cumsum(lengths)
    starts = np.arange(num_samples + 1, dtype=np.int64) * sequence_length
    doc = np.searchsorted(ends, starts, side="right")
    past_end = doc >= len(document_index)  # only the last start of a partial final sample
    doc = np.minimum(doc, len(document_index) - 1)
    offset = starts - (ends[doc] - lengths[doc])
    offset[past_end] = lengths[-1] - add_extra_token
    doc[0], offset[0] = 0, 0
    dtype = np.int32 if max(len(document_index), int(np.max(sizes))) <= np.iinfo(np.int32).max \
        else np.int64
    return np.stack((doc, offset), axis=1).astype(dtype)


def build_shuffle_index(num_samples: int, total_size: int,
                        rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples), then one of [num_samples, total_size) appended."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``sequence_length`` tokens from a low-level dataset.

    ``low_level`` needs ``sequence_lengths`` (int32 numpy array) and
    ``get(index, offset, length)``; ``documents`` are the ids of this split's documents;
    ``num_samples`` is how many samples the caller will draw (None: one epoch).
    With ``config.path_to_cache`` the indices are built once (by global rank 0 while the
    other ranks wait) and memory-mapped from .npy files afterwards.
    """

    def __init__(self, low_level, documents: np.ndarray, num_samples: Optional[int],
                 index_split: Split, config: GPTDatasetConfig, dataset_path: str = None):
        self.dataset, self.config, self.index_split = low_level, config, index_split
        self.dataset_path = dataset_path
        self.documents = np.asarray(documents, dtype=np.int32)
        self.num_samples = num_samples
        self.document_index, self.sample_index, self.shuffle_index = cached_indices(
            self._description(), config.path_to_cache, self._build_indices,
            ("document_index", "sample_index", "shuffle_index"))
        self._positions = torch.arange(config.sequence_length, dtype=torch.long)
        self._ones = torch.ones(config.sequence_length, dtype=torch.float)

    def _description(self) -> dict:
        cfg, docs = self.config, self.documents
        return {"class": type(self).__name__, "dataset_path": self.dataset_path,
                "num_samples": self.num_samples, "index_split": self.index_split.name,
                "documents": [int(docs[0]), int(docs[-1]) + 1] if len(docs) else [0, 0],
                "random_seed": cfg.random_seed, "sequence_length": cfg.sequence_length,
                "drop_last_partial_validation_sequence":
                    cfg.drop_last_partial_validation_sequence}

    def _build_indices(self):
        seq = self.config.sequence_length
        tokens_per_epoch = int(np.sum(self.dataset.sequence_lengths[self.documents],
                                      dtype=np.int64))
        if tokens_per_epoch <= 1:
            raise DataError(f"the {self.index_split.name} split of {self.dataset_path} holds "
                            f"{tokens_per_epoch} tokens; it cannot make a sample.")
        num_epochs = 1
        if self.num_samples is not None:
            needed = self.num_samples * seq + 1
            num_epochs = max(1, -(-needed // tokens_per_epoch))
        separate_final_epoch = False
        if num_epochs > 1:
            samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq
            samples_from_final = self.num_samples - samples_before_final
            samples_per_epoch = (tokens_per_epoch - 1) // seq
            separate_final_epoch = samples_from_final < int(0.80 * samples_per_epoch)
        rng = np.random.RandomState(self.config.random_seed)
        document_index = build_document_index(self.documents, num_epochs, rng,
                                              separate_final_epoch)
        drop_last = self.index_split != Split.valid or \
            self.config.drop_last_partial_validation_sequence
        sample_index = build_sample_index(self.dataset.sequence_lengths, document_index, seq,
                                          num_epochs, tokens_per_epoch, drop_last)
        total = sample_index.shape[0] - 1
        first = samples_before_final if separate_final_epoch else total
        return document_index, sample_index, build_shuffle_index(first, total, rng)

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 token ids of sample ``idx`` (padded with ``pad`` if short)."""
        i = self.shuffle_index[idx]
        (doc_beg, off_beg), (doc_end, off_end) = self.sample_index[i], self.sample_index[i + 1]
        if doc_beg == doc_end:
            parts = [self.dataset.get(self.document_index[doc_beg], offset=int(off_beg),
                                      length=int(off_end - off_beg + 1))]
        else:
            parts = [self.dataset.get(self.document_index[doc_beg], offset=int(off_beg))]
            parts += [self.dataset.get(self.document_index[d]) for d in range(doc_beg + 1, doc_end)]
            parts.append(self.dataset.get(self.document_index[doc_end], offset=0,
                                          length=int(off_end + 1)))
        tokens = np.concatenate(parts).astype(np.int64, copy=False)
        short = self.config.sequence_length + 1 - len(tokens)
        if short > 0:
            tokens = np.concatenate((tokens, np.full(short, self.config.pad, dtype=np.int64)))
        return tokens

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        text = torch.from_numpy(self.sample_tokens(idx))
        tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        cfg = self.config
        loss_mask, position_ids = self._ones, self._positions
        sample = {}
        if cfg.eod_mask_loss or cfg.reset_position_ids or cfg.reset_attention_mask or \
                (labels == cfg.pad).any():
            loss_mask, position_ids, mask = _masks_and_positions(tokens, cfg)
            loss_mask[labels == cfg.pad] = 0.0
            if mask is not None:
                sample["document_ids" if cfg.document_ids else "attention_mask"] = mask
        tokens[tokens == cfg.pad] = 0
        labels[labels == cfg.pad] = 0
        sample.update(tokens=tokens, labels=labels, loss_mask=loss_mask.clone(),
                      position_ids=position_ids.clone())
        return sample


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Each token's document number as --reset-attention-mask sees documents: one ends with
    (and includes) its end-of-document token. Token i may attend to j <= i of equal number."""
    ends = (tokens == eod).long()
    return torch.cumsum(ends, dim=-1) - ends


def document_attention_mask(ids: torch.Tensor) -> torch.Tensor:
    """Megatron's dense boolean mask [b, 1, s, s] (True = masked) of document ids [b, s]."""
    s = ids.shape[-1]
    allowed = ids[:, :, None] == ids[:, None, :]
    allowed &= torch.ones(s, s, dtype=torch.bool, device=ids.device).tril_()
    return (~allowed).unsqueeze(1)


def _masks_and_positions(tokens: torch.Tensor, cfg: GPTDatasetConfig):
    """Loss mask, position ids and (only with reset_attention_mask) Megatron's boolean
    [1, s, s] attention mask, True where attention is not allowed (or with document_ids, the
    document ids [s])."""
    s = tokens.numel()
    loss_mask = torch.ones(s, dtype=torch.float)
    if cfg.eod_mask_loss:
        loss_mask[tokens == cfg.eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long)
    mask = None
    eods = (tokens == cfg.eod).nonzero().flatten().tolist()
    if cfg.reset_attention_mask and cfg.document_ids:
        mask = document_ids(tokens, cfg.eod)
    elif cfg.reset_attention_mask:
        allowed = torch.tril(torch.ones((s, s), dtype=torch.bool))
        for i in eods:
            allowed[i + 1:, :i + 1] = False
        mask = (~allowed).unsqueeze(0)
    if cfg.reset_position_ids:
        prev = 0
        for i in eods:
            position_ids[i + 1:] -= i + 1 - prev
            prev = i + 1
    return loss_mask, position_ids, mask


class MockGPTLowLevelDataset:
    """Megatron's mock documents: 100,000 documents with lengths drawn from a fixed seed
    (numpy default_rng(0), in [1, 4096)), each the tokens 1, 2, 3, ... (modulo the
    vocabulary) followed by the end-of-document token."""

    seed, size, max_sequence_length = 0, 100000, 4096

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod
        rng = np.random.default_rng(seed=self.seed)
        self.sequence_lengths = rng.integers(low=1, high=self.max_sequence_length,
                                             size=self.size, dtype=np.int32)

    def __len__(self) -> int:
        return self.size

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        n = int(self.sequence_lengths[idx])
        if length is None:
            length = n - offset
        doc = np.concatenate(((np.arange(n - 1, dtype=np.int64) + 1) % self.vocab_size,
                              [self.eod]))
        return doc[offset:offset + length]
