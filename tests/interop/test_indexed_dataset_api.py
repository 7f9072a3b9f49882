"""A preprocessing script written for megatron-core's ``indexed_dataset`` Python API runs here
unchanged, and writes the same bytes and reads back the same values as under megatron-core."""

import os
import subprocess
import sys

from tests.helpers import REPO

# A user's script, written against megatron-core 0.16.1 (its import paths and calls).
USER_SCRIPT = '''
import sys

import numpy as np
import torch

from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

out = sys.argv[1]
docs = [[[1, 2, 3]], [[4, 5], [6, 7, 8]], [[60000, 9, 10, 11]], [[12]]]
dtype = DType.optimal_dtype(65000)

builder = IndexedDatasetBuilder(get_bin_path(out + "/a"), dtype=dtype)
for doc in docs:
    for sentence in doc:
        builder.add_item(torch.tensor(sentence))
    builder.end_document()
builder.finalize(get_idx_path(out + "/a"))

builder = IndexedDatasetBuilder(get_bin_path(out + "/b"), dtype=np.int32)
for doc in docs:
    builder.add_document(torch.tensor([t for s in doc for t in s]), [len(s) for s in doc])
builder.finalize(get_idx_path(out + "/b"))

builder = IndexedDatasetBuilder(get_bin_path(out + "/c"), dtype=dtype)
builder.add_index(out + "/a")
builder.add_index(out + "/a")
builder.finalize(get_idx_path(out + "/c"))

for name in ("a", "b", "c"):
    for mmap in (True, False):
        ds = IndexedDataset(out + "/" + name, multimodal=False, mmap=mmap)
        print(name, mmap, len(ds), IndexedDataset.exists(out + "/" + name), str(ds[0].dtype),
              ds.sequence_lengths.tolist(), ds.document_indices.tolist(), ds[1].tolist(),
              ds[np.int64(2)].tolist(), [s.tolist() for s in ds[1:3]],
              ds.get(1, offset=1, length=1).tolist(), ds.get(2, 1).tolist())
print(IndexedDataset.exists(out + "/missing"), DType.size(dtype), DType.code_from_dtype(dtype))
'''


def run(python, script, out, env=None, cwd="/"):
    result = subprocess.run([python, script, out], capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_megatron_core_preprocessing_script_runs_unchanged(mcore_python, tmp_path):
    script = tmp_path / "user_preprocess.py"
    script.write_text(USER_SCRIPT)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO)
    printed_here = run(sys.executable, str(script), str(ours), env=env)
    # -P: megatron-core's venv must not see this checkout's megatron package
    printed_there = subprocess.run(
        [mcore_python, "-P", str(script), str(theirs)], capture_output=True, text=True,
        cwd="/", timeout=300)
    assert printed_there.returncode == 0, printed_there.stderr[-3000:]
    assert printed_here == printed_there.stdout
    for name in ("a", "b", "c"):
        for ext in (".bin", ".idx"):
            assert (ours / f"{name}{ext}").read_bytes() == \
                (theirs / f"{name}{ext}").read_bytes(), name + ext
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))  # no .tmp left behind
