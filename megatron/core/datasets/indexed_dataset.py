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

Reading memory-maps both files (or reads ``.bin`` with plain file reads, ``mmap=False``).
Writing streams tokens to ``.bin`` and writes ``.idx`` at the end; both appear under their
final names only when complete. No torch import here, so tools that only tokenize start fast.

The classes keep megatron-core's Python interface, so preprocessing scripts written for
``megatron.core.datasets.indexed_dataset`` run unchanged: ``IndexedDatasetBuilder(bin_path)``
... ``finalize(idx_path)``, ``IndexedDataset(prefix, multimodal=False, mmap=True)``, ``DType``,
``get_bin_path`` / ``get_idx_path``. Multimodal datasets (a mode byte per sequence) are refused.
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


get_idx_path, get_bin_path = idx_path, bin_path  # megatron-core's names


class DType:
    """megatron-core's dtype helpers, as preprocessing scripts call them."""

    optimal_dtype = staticmethod(optimal_dtype)

    @staticmethod
    def code_from_dtype(value) -> int:
        return DTYPE_CODES[np.dtype(value)]

    @staticmethod
    def dtype_from_code(value: int):
        return DTYPES[value]

    @staticmethod
    def size(key) -> int:
        return np.dtype(DTYPES[key] if isinstance(key, int) else key).itemsize


def _refuse_multimodal(multimodal: bool) -> None:
    if multimodal:
        raise DataError("multimodal indexed datasets (a mode per sequence) are not supported; "
                        "build and read them with multimodal=False.")


class IndexedDataset:
    """Memory-mapped reader: ``len()`` sequences, ``ds[i]`` / ``ds.get(i, offset, length)``
    give numpy token arrays, ``ds[i:j]`` a list of them. Raises DataError (naming the path)
    for a missing or malformed pair of files. ``mmap=False`` reads ``.bin`` with file reads
    (Megatron's ``--no-mmap-bin-files``)."""

    def __init__(self, path_prefix: str, multimodal: bool = False, mmap: bool = True):
        _refuse_multimodal(multimodal)
        self.path_prefix, self.multimodal, self.mmap = path_prefix, False, mmap
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
        self._bin = None
        if mmap:
            self._bin = np.memmap(bin_, mode="r", dtype=np.uint8) if actual else \
                np.zeros(0, np.uint8)

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

    def _read(self, count: int, start: int) -> np.ndarray:
        if self._bin is not None:
            return np.frombuffer(self._bin, self.dtype, count, start)
        with open(bin_path(self.path_prefix), "rb") as f:
            f.seek(start)
            return np.fromfile(f, self.dtype, count)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset .. offset + length`` of sequence ``idx`` (a read-only view)."""
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        start = int(self.sequence_pointers[idx]) + offset * self.dtype().itemsize
        return self._read(length, start)

    def __getitem__(self, idx):
        """One sequence for an int, a list of sequences for a contiguous slice."""
        if isinstance(idx, (int, np.integer)):
            return self.get(idx)
        if not isinstance(idx, slice):
            raise TypeError(f"Unexpected type received for idx: {type(idx)}")
        start, stop, step = idx.indices(len(self))
        if step != 1:
            raise ValueError("Slices into indexed_dataset must be contiguous")
        lengths = self.sequence_lengths[idx]
        if len(lengths) == 0:
            return []
        tokens = self._read(int(lengths.sum()), int(self.sequence_pointers[start]))
        return np.split(tokens, np.cumsum(lengths)[:-1])

    @property
    def sequence_modes(self) -> np.ndarray:
        _refuse_multimodal(True)

    def get_document_indices(self) -> np.ndarray:
        return self.document_indices

    def set_document_indices(self, document_indices: np.ndarray) -> None:
        self.document_indices = document_indices

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(idx_path(path_prefix)) and os.path.isfile(bin_path(path_prefix))


class IndexedDatasetBuilder:
    """Streams sequences into ``<prefix>.bin``; ``finalize()`` writes ``<prefix>.idx``.

    ``path`` is a prefix, or (megatron-core's form) the ``.bin`` path itself, in which case
    ``finalize(idx_path)`` names the index. Both files are written under ``.tmp`` names and
    renamed on ``finalize()``, so a path never holds a half-written dataset. Per-sequence
    bookkeeping is 12 bytes.
    """

    def __init__(self, path: str, dtype=np.int32, multimodal: bool = False):
        _refuse_multimodal(multimodal)
        self._bin_path = path if path.endswith(".bin") else bin_path(path)
        self.path_prefix = self._bin_path[:-len(".bin")]
        self.dtype = np.dtype(dtype)
        self._tmp_bin, self._tmp_idx = self._bin_path + ".tmp", None
        if os.path.dirname(self._bin_path):
            os.makedirs(os.path.dirname(self._bin_path), exist_ok=True)
        self._data = open(self._tmp_bin, "wb")
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])

    def add_item(self, tokens, mode: int = 0) -> None:
        """Append one sequence (a torch tensor, a numpy array or any sequence of ints)."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        self._data.write(tokens.tobytes(order="C"))
        self.sequence_lengths.append(tokens.size)

    def end_document(self) -> None:
        """Close the current document (after its sequences were added with add_item)."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths, modes=None) -> None:
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

    def finalize(self, idx_path: Optional[str] = None) -> None:
        """Write the index (at ``idx_path``, default ``<prefix>.idx``) and move both files
        into place (.bin first, .idx last)."""
        final_idx = idx_path or get_idx_path(self.path_prefix)
        self._data.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        tmp_idx = self._tmp_idx = final_idx + ".tmp"
        with open(tmp_idx, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.frombuffer(self.document_indices, dtype=np.int64).tobytes(order="C"))
        os.replace(self._tmp_bin, self._bin_path)
        os.replace(tmp_idx, final_idx)

    def discard(self) -> None:
        """Abandon the dataset: close and delete the temporary files."""
        self._data.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if path and os.path.exists(path):
                os.remove(path)
