"""The .bin/.idx reader and builder: round trips, atomic writes, and malformed files."""

import os
import struct

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    optimal_dtype,
)
from megatron.core.datasets.utils import DataError

DOCS = [[[1, 2, 3]], [[4, 5], [6, 7, 8]], [[65000, 9]]]


def write(prefix, docs=DOCS, dtype=np.uint16):
    builder = IndexedDatasetBuilder(prefix, dtype)
    for doc in docs:
        for sentence in doc:
            builder.add_item(sentence)
        builder.end_document()
    builder.finalize()
    return IndexedDataset(prefix)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    ds = write(str(tmp_path / "d"), dtype=dtype)
    assert len(ds) == 4 and ds.dtype == dtype
    assert [ds[i].tolist() for i in range(4)] == [[1, 2, 3], [4, 5], [6, 7, 8], [65000, 9]]
    assert ds.document_indices.tolist() == [0, 1, 3, 4]
    assert ds.sequence_lengths.tolist() == [3, 2, 3, 2]
    assert ds.get(2, offset=1, length=2).tolist() == [7, 8]
    size = np.dtype(dtype).itemsize
    assert ds.sequence_pointers.tolist() == [0, 3 * size, 5 * size, 8 * size]
    assert os.path.getsize(tmp_path / "d.bin") == 10 * size


def test_index_layout_byte_for_byte(tmp_path):
    write(str(tmp_path / "d"))
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", raw[9:34]) == (1, 8, 4, 4)  # version, uint16, N, D
    assert np.frombuffer(raw[34:50], np.int32).tolist() == [3, 2, 3, 2]
    assert len(raw) == 34 + 4 * 4 + 8 * 4 + 8 * 4


def test_add_document_and_merge(tmp_path):
    a = IndexedDatasetBuilder(str(tmp_path / "a"), np.int32)
    a.add_document([1, 2, 3, 4, 5], [2, 3])
    a.finalize()
    write(str(tmp_path / "b"), dtype=np.int32)
    merged = IndexedDatasetBuilder(str(tmp_path / "m"), np.int32)
    merged.add_index(str(tmp_path / "a"))
    merged.add_index(str(tmp_path / "b"))
    merged.finalize()
    m = IndexedDataset(str(tmp_path / "m"))
    assert m.document_indices.tolist() == [0, 2, 3, 5, 6]
    assert [m[i].tolist() for i in range(len(m))][:3] == [[1, 2], [3, 4, 5], [1, 2, 3]]
    with pytest.raises(DataError, match="holds uint16 tokens"):
        IndexedDatasetBuilder(str(tmp_path / "x"), np.int32).add_index(str(write(
            str(tmp_path / "u")).path_prefix))


def test_files_appear_only_when_complete(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "d"), np.uint16)
    builder.add_item([1, 2])
    assert not IndexedDataset.exists(str(tmp_path / "d"))
    builder.discard()
    assert os.listdir(tmp_path) == []


def test_optimal_dtype():
    assert optimal_dtype(65499) == np.uint16 and optimal_dtype(65500) == np.int32


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(b"XXXXXXXXX" + p.read_bytes()[9:]), "wrong magic"),
    (lambda p: p.write_bytes(p.read_bytes()[:9] + struct.pack("<Q", 2) + p.read_bytes()[17:]),
     "index version 2"),
    (lambda p: p.write_bytes(p.read_bytes()[:-8]), "truncated or damaged"),
])
def test_damaged_index_is_refused(tmp_path, damage, message):
    write(str(tmp_path / "d"))
    damage(tmp_path / "d.idx")
    with pytest.raises(DataError, match=message) as info:
        IndexedDataset(str(tmp_path / "d"))
    assert str(tmp_path / "d.idx") in str(info.value)


def test_bin_that_does_not_match_is_refused(tmp_path):
    write(str(tmp_path / "d"))
    with open(tmp_path / "d.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match="holds 22 bytes but .* describes 20"):
        IndexedDataset(str(tmp_path / "d"))


def test_missing_files_are_named(tmp_path):
    write(str(tmp_path / "d"))
    os.remove(tmp_path / "d.bin")
    with pytest.raises(DataError, match=f"has no {tmp_path / 'd.bin'}"):
        IndexedDataset(str(tmp_path / "d"))
