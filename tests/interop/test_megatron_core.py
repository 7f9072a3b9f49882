"""Interoperability with megatron-core 0.16.1, run in its own virtual environment: the same
.bin/.idx bytes both ways, and the same samples from GPTDataset and BlendedDataset."""

import json
import os
import subprocess

import numpy as np
import preprocess_data
import pytest

from megatron.core.datasets.builder import build_gpt_datasets
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.utils import parse_and_normalize_split
from tests.helpers import REPO, free_port

SIDE = os.path.join(REPO, "tests", "interop", "mcore_side.py")
DOCS = [[[1, 2, 3]], [[4, 5], [6, 7, 8]], [[60000, 9, 10, 11]], [[12]]]


def mcore(python, command, arguments, tmp_path):
    out = str(tmp_path / f"{command}.npz")
    result = subprocess.run([python, "-P", SIDE, command, json.dumps(arguments), out],
                            capture_output=True, text=True, cwd="/", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_files_are_byte_identical_both_ways(mcore_python, tmp_path, dtype):
    ours = IndexedDatasetBuilder(str(tmp_path / "ours"), getattr(np, dtype))
    for doc in DOCS:
        for sentence in doc:
            ours.add_item(sentence)
        ours.end_document()
    ours.finalize()
    mcore(mcore_python, "write", {"prefix": str(tmp_path / "theirs"), "dtype": dtype,
                                  "documents": DOCS}, tmp_path)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
    theirs = IndexedDataset(str(tmp_path / "theirs"))  # megatron-core's files, read here
    assert [theirs[i].tolist() for i in range(len(theirs))] == [s for d in DOCS for s in d]


@pytest.fixture(scope="module")
def datasets(corpus, sp_model, tmp_path_factory):
    """Two tokenized datasets: the corpus, and its first 40 documents."""
    out = tmp_path_factory.mktemp("interop")
    head = out / "head.jsonl"
    with open(corpus) as f, open(head, "w") as g:
        g.writelines(line for _, line in zip(range(40), f))
    prefixes = []
    for name, path in (("all", corpus), ("head", str(head))):
        assert preprocess_data.main(["--input", path, "--output-prefix", str(out / name),
                                     "--tokenizer-type", "GPTSentencePieceTokenizer",
                                     "--tokenizer-model", sp_model, "--append-eod"]) == 0
        prefixes.append(str(out / f"{name}_text_document"))
    return prefixes


def test_megatron_core_reads_what_preprocess_writes(mcore_python, datasets, tmp_path):
    theirs = mcore(mcore_python, "read", {"prefix": datasets[0]}, tmp_path)
    ours = IndexedDataset(datasets[0])
    assert str(theirs["dtype"]) == "uint16"
    np.testing.assert_array_equal(theirs["lengths"], ours.sequence_lengths)
    np.testing.assert_array_equal(theirs["document_indices"], ours.document_indices)
    np.testing.assert_array_equal(theirs["tokens"],
                                  np.concatenate([ours[i] for i in range(len(ours))]))


CASES = {
    "single": dict(blend=lambda p: [[p[0]], None], split="90,8,2"),
    "weighted blend": dict(blend=lambda p: [p, [0.3, 0.7]], split="90,8,2"),
    "blend by size": dict(blend=lambda p: [p, None], split="80,15,5"),
    "per split": dict(blend_per_split=lambda p: [[[p[0]], None], [p, [0.5, 0.5]],
                                                 [[p[1]], None]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_samples_as_megatron_core(mcore_python, datasets, tmp_path, case):
    spec = CASES[case]
    sizes, seq, seed = [2000, 200, 40], 96, 4321
    arguments = {"seed": seed, "seq_length": seq, "sizes": sizes, "count": 200,
                 "cache": str(tmp_path / "mcore_cache"), "eod": 2, "pad": -1,
                 "vocab_size": 1000, "port": free_port(), "split": spec.get("split")}
    blend = spec["blend"](datasets) if "blend" in spec else None
    per_split = spec["blend_per_split"](datasets) if "blend_per_split" in spec else None
    arguments.update(blend=blend, blend_per_split=per_split)
    theirs = mcore(mcore_python, "samples", arguments, tmp_path)
    config = GPTDatasetConfig(sequence_length=seq, random_seed=seed, eod=2,
                              path_to_cache=str(tmp_path / "our_cache"))
    ours = build_gpt_datasets(config, sizes, parse_and_normalize_split(spec.get("split") or "1"),
                              blend=tuple(blend) if blend else None,
                              blend_per_split=[tuple(b) for b in per_split] if per_split
                              else None)
    for name, ds in zip(("train", "valid", "test"), ours):
        assert len(ds) == int(theirs[f"{name}_len"]), name
        n = theirs[f"{name}_tokens"].shape[0]
        np.testing.assert_array_equal(np.stack([ds[i]["tokens"].numpy() for i in range(n)]),
                                      theirs[f"{name}_tokens"], err_msg=name)
        np.testing.assert_array_equal(np.stack([ds[i]["labels"].numpy() for i in range(n)]),
                                      theirs[f"{name}_labels"], err_msg=name)
