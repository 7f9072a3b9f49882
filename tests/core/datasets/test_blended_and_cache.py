"""Blending order against a transcription of megatron-core's helper, and the index cache."""

import os

import numpy as np
import pytest

from megatron.core import ConfigError
from megatron.core.datasets.blended_dataset import (
    build_blending_indices,
    build_exhaustive_blending_indices,
)
from megatron.core.datasets.builder import build_gpt_datasets
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTLowLevelDataset
from megatron.core.datasets.utils import parse_and_normalize_split, parse_blend


def blending_loop(weights, size):
    """helpers.cpp build_blending_indices, loop for loop."""
    counts = np.zeros(len(weights), dtype=np.int64)
    which, nth = [], []
    for i in range(size):
        t = max(float(i), 1.0)
        errors = [w * t - c for w, c in zip(weights, counts)]
        best = 0
        for j in range(1, len(weights)):
            if errors[j] > errors[best]:
                best = j
        which.append(best)
        nth.append(counts[best])
        counts[best] += 1
    return which, nth


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.5, 0.5], [0.2, 0.3, 0.5], [0.1] * 10,
                                     [0.001, 0.999]])
def test_greedy_order_matches_helper(weights):
    which, nth = build_blending_indices(weights, 5000)
    expected_which, expected_nth = blending_loop(weights, 5000)
    assert which.tolist() == expected_which and nth.tolist() == expected_nth
    assert which.dtype == np.int16 and nth.dtype == np.int64


def test_exhaustive_blend_uses_every_sample_once():
    which, nth = build_exhaustive_blending_indices([3, 5, 0, 2])
    assert len(which) == 10 and np.bincount(which, minlength=4).tolist() == [3, 5, 0, 2]
    for j in range(4):
        assert sorted(nth[which == j].tolist()) == list(range((3, 5, 0, 2)[j]))


def test_blend_parsing():
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    for bad, message in ((["0.3", "a", "0.7"], "weight/prefix pairs"),
                         (["0", "a", "0", "b"], "sum to zero"),
                         (["x1", "a", "0.5", "b"], "mixes weights"),
                         (["-1", "a", "2", "b"], "not a non-negative number")):
        with pytest.raises(ConfigError, match=message):
            parse_blend(bad)


def test_indices_are_cached_and_reused(tmp_path):
    low = MockGPTLowLevelDataset(vocab_size=1000, eod=1000)
    cfg = GPTDatasetConfig(sequence_length=64, random_seed=5, eod=1000,
                           path_to_cache=str(tmp_path))
    split = parse_and_normalize_split("98,1,1")
    first = build_gpt_datasets(cfg, [500, 50, 10], split, blend=(["m"], None),
                               open_dataset=lambda _: low)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 12 and all(f.endswith((".npy", ".txt")) for f in files)
    stamps = {f: os.stat(tmp_path / f).st_mtime_ns for f in files}
    second = build_gpt_datasets(cfg, [500, 50, 10], split, blend=(["m"], None),
                                open_dataset=lambda _: low)
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in files} == stamps  # loaded, not rebuilt
    for a, b in zip(first, second):
        assert isinstance(b.sample_index, np.memmap)
        np.testing.assert_array_equal(a.sample_index, b.sample_index)
        np.testing.assert_array_equal(a[3]["tokens"], b[3]["tokens"])
