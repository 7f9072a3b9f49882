"""Megatron-LM's tokenized dataset files, ``<prefix>.bin`` and ``<prefix>.idx``, byte for byte.

    .idx: b"MMIDIDX\\x00\\x00"   magic (9 bytes)
          <Q version = 1
          <B dtype code          (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                  7 float32, 8 uint16)
          <Q sequence count N
          <Q document count D    (= documents + 1: document_indices starts with 0)
          int32[N]  sequence lengths, in tokens
          int64[N]  sequence pointers, byte offsets into .bin
          int64[D]  document indices: the sequence index where each document ends
    .bin: the tokens of every sequence, back to back, in the dtype above.

Reading memory-maps both files. Writing streams tokens to ``.bin`` and writes ``.idx`` at
the end; both appear under their final names only when complete. No torch import here, so
tools that only tokenize start fast.
"""

import os
import shutil
import struct
from array import array
from typing import Optional

import numpy as np

from megatron.core.datasets.utils import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def optimal_dtype(vocab_size: Optional[int]):
    """uint16 when every id fits comfortably (vocabulary under 65,500), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


class IndexedDataset:
    """Memory-mapped reader: ``len()`` sequences, ``ds[i]`` / ``ds.get(i, offset, length)``
    give numpy token arrays. Raises DataError (naming the path) for a missing or malformed
    pair of files."""

    def __init__(self, path_prefix: str):
        self.path_prefix = path_prefix
        idx, bin_ = idx_path(path_prefix), bin_path(path_prefix)
        missing = [p for p in (idx, bin_) if not os.path.isfile(p)]
        if missing:
            raise DataError(f"dataset prefix {path_prefix} has no {' or '.join(missing)}.")
        self._read_index(idx)
        expected = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * \
            self.dtype().itemsize if len(self.sequence_lengths) else 0
        actual = os.path.getsize(bin_)
        if actual != expected:
            raise DataError(f"{bin_} holds {actual} bytes but {idx} describes {expected}; the "
                            "pair is incomplete or from different runs.")
        self._bin = np.memmap(bin_, mode="r", dtype=np.uint8) if actual else np.zeros(0, np.uint8)

    def _read_index(self, path: str) -> None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = f.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES or header[:9] != INDEX_HEADER:
            raise DataError(f"{path} is not a Megatron index file (wrong magic bytes).")
        version, = struct.unpack("<Q", header[9:17])
        if version != 1:
            raise DataError(f"{path} has index version {version}; only version 1 is known.")
        code = header[17]
        if code not in DTYPES:
            raise DataError(f"{path} has an unknown dtype code {code}.")
        self.dtype = DTYPES[code]
        n, d = struct.unpack("<QQ", header[18:34])
        expected = _HEADER_BYTES + 12 * n + 8 * d
        if size not in (expected, expected + n):  # + n: multimodal files carry one mode byte
            raise DataError(f"{path} is {size} bytes but its header describes {n} sequences and "
                            f"{d} document indices ({expected} bytes); the file is truncated "
                            "or damaged.")
        buf = np.memmap(path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(buf, np.int32, n, _HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(buf, np.int64, n, _HEADER_BYTES + 4 * n)
        self.document_indices = np.frombuffer(buf, np.int64, d, _HEADER_BYTES + 12 * n)
        if d == 0 or self.document_indices[-1] != n:
            raise DataError(f"{path}: the document indices do not end at the sequence count "
                            f"{n}; the file is damaged.")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset .. offset + length`` of sequence ``idx`` (a read-only view)."""
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        start = int(self.sequence_pointers[idx]) + offset * self.dtype().itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(idx_path(path_prefix)) and os.path.isfile(bin_path(path_prefix))


class IndexedDatasetBuilder:
    """Streams sequences into ``<prefix>.bin``; ``finalize()`` writes ``<prefix>.idx``.

    Both files are written under ``.tmp`` names and renamed on ``finalize()``, so a
    prefix never holds a half-written dataset. Per-sequence bookkeeping is 12 bytes.
    """

    def __init__(self, path_prefix: str, dtype=np.int32):
        self.path_prefix = path_prefix
        self.dtype = np.dtype(dtype)
        self._tmp_bin = bin_path(path_prefix) + ".tmp"
        if os.path.dirname(path_prefix):
            os.makedirs(os.path.dirname(path_prefix), exist_ok=True)
        self._data = open(self._tmp_bin, "wb")
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])

    def add_item(self, tokens) -> None:
        """Append one sequence (any sequence of ints or a numpy array)."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        self._data.write(tokens.tobytes(order="C"))
        self.sequence_lengths.append(tokens.size)

    def end_document(self) -> None:
        """Close the current document (after its sequences were added with add_item)."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths) -> None:
        """Append a document made of sequences of ``lengths`` tokens, concatenated."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        self._data.write(tokens.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append a whole existing dataset (same dtype)."""
        other = IndexedDataset(path_prefix)
        if np.dtype(other.dtype) != self.dtype:
            raise DataError(f"{path_prefix} holds {np.dtype(other.dtype).name} tokens but this "
                            f"dataset is {self.dtype.name}; merge datasets of one tokenizer.")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.tolist())
        self.document_indices.extend((other.document_indices[1:] + offset).tolist())
        with open(bin_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self._data, 16 << 20)

    def finalize(self) -> None:
        """Write the index and move both files into place (.bin first, .idx last)."""
        self._data.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        tmp_idx = idx_path(self.path_prefix) + ".tmp"
        with open(tmp_idx, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.frombuffer(self.document_indices, dtype=np.int64).tobytes(order="C"))
        os.replace(self._tmp_bin, bin_path(self.path_prefix))
        os.replace(tmp_idx, idx_path(self.path_prefix))

    def discard(self) -> None:
        """Abandon the dataset: close and delete the temporary files."""
        self._data.close()
        for path in (self._tmp_bin, idx_path(self.path_prefix) + ".tmp"):
            if os.path.exists(path):
                os.remove(path)
