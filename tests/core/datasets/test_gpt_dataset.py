"""GPTDataset indices against a line-by-line port of megatron-core's compiled helper."""

import numpy as np
import pytest

from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    MockGPTLowLevelDataset,
    build_sample_index,
)
from megatron.core.datasets.samplers import MegatronPretrainingSampler
from megatron.core.datasets.utils import Split, get_split_indices, parse_and_normalize_split


def sample_index_loop(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                      drop_last=True, extra=1):
    """megatron-core helpers.cpp build_sample_idx, transcribed loop for loop."""
    if drop_last:
        num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length
    else:
        num_samples = -(-(num_epochs * tokens_per_epoch - extra) // seq_length)
    out = [(0, 0)]
    doc_i, offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_length + extra
        while remaining != 0:
            length = sizes[document_index[doc_i]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - extra
                remaining = 0
            else:
                if doc_i == len(document_index) - 1:
                    offset = sizes[document_index[doc_i]] - extra
                    break
                doc_i += 1
                offset = 0
        out.append((doc_i, offset))
    return np.array(out)


@pytest.mark.parametrize("seed", range(12))
def test_vectorized_sample_index_matches_helper(seed):
    rng = np.random.default_rng(seed)
    n_docs = int(rng.integers(1, 40))
    sizes = rng.integers(0 if seed % 3 == 0 else 1, 60, size=n_docs).astype(np.int32)
    sizes[0] = max(sizes[0], 1)
    epochs = int(rng.integers(1, 4))
    document_index = np.tile(np.arange(n_docs, dtype=np.int32), epochs)
    rng.shuffle(document_index)
    tokens = int(sizes.sum())
    seq = int(rng.integers(2, 50))
    for drop_last in (True, False):
        if tokens * epochs - 1 < seq and drop_last:
            continue
        expected = sample_index_loop(sizes, document_index, seq, epochs, tokens, drop_last)
        got = build_sample_index(sizes, document_index, seq, epochs, tokens, drop_last)
        np.testing.assert_array_equal(got, expected)


def test_samples_overlap_by_one_token_and_cover_the_stream():
    low = MockGPTLowLevelDataset(vocab_size=10_000, eod=9_999)
    cfg = GPTDatasetConfig(sequence_length=64, random_seed=3, eod=9_999)
    ds = GPTDataset(low, np.arange(0, 50, dtype=np.int32), 100, Split.train, cfg)
    stream = np.concatenate([low.get(d) for d in ds.document_index])
    for i in (0, 1, 57):
        raw = ds.shuffle_index[i]
        np.testing.assert_array_equal(ds.sample_tokens(i), stream[raw * 64: raw * 64 + 65])
    sample = ds[0]
    np.testing.assert_array_equal(sample["labels"][:-1].numpy(), sample["tokens"][1:].numpy())
    assert sample["tokens"].shape == (64,) and "attention_mask" not in sample


def test_mock_documents_count_then_end():
    low = MockGPTLowLevelDataset(vocab_size=100, eod=100)
    lengths = np.random.default_rng(0).integers(1, 4096, size=100000, dtype=np.int32)
    np.testing.assert_array_equal(low.sequence_lengths, lengths)
    doc = low.get(3)
    n = int(lengths[3])
    assert len(doc) == n and doc[-1] == 100
    np.testing.assert_array_equal(doc[:-1], (np.arange(1, n)) % 100)
    np.testing.assert_array_equal(low.get(3, offset=5, length=4), doc[5:9])


def test_epochs_and_separate_last_epoch():
    low = MockGPTLowLevelDataset(vocab_size=1000, eod=1000)
    cfg = GPTDatasetConfig(sequence_length=128, random_seed=1, eod=1000)
    docs = np.arange(10, dtype=np.int32)
    tokens = int(low.sequence_lengths[:10].sum())
    per_epoch = (tokens - 1) // 128
    ds = GPTDataset(low, docs, per_epoch + 3, Split.train, cfg)  # barely into epoch 2
    assert len(ds.document_index) == 20
    # the last epoch is shuffled on its own: the first ten entries are one whole epoch
    assert sorted(ds.document_index[:10]) == list(range(10))
    first = ds.shuffle_index[:per_epoch]
    assert sorted(first) == list(range(per_epoch))  # first-epoch samples shuffled among themselves
    assert len(ds) >= per_epoch + 3


def test_eod_mask_and_reset_positions():
    low = MockGPTLowLevelDataset(vocab_size=1000, eod=1000)
    cfg = GPTDatasetConfig(sequence_length=256, random_seed=1, eod=1000, eod_mask_loss=True,
                           reset_position_ids=True, reset_attention_mask=True)
    ds = GPTDataset(low, np.arange(100, dtype=np.int32), 50, Split.train, cfg)
    for i in range(len(ds)):
        s = ds[i]
        eods = (s["tokens"] == 1000).nonzero().flatten().tolist()
        if eods:
            break
    e = eods[0]
    assert s["loss_mask"][e] == 0 and s["loss_mask"].sum() == 256 - len(eods)
    assert s["position_ids"][e + 1] == 0 if e + 1 < 256 else True
    mask = s["attention_mask"][0]
    if e + 1 < 256:
        assert mask[e + 1, e] and not mask[e + 1, e + 1]  # masked across the document end
    assert mask[0, 1] and not mask[1, 0]  # causal


def test_split_like_megatron():
    assert parse_and_normalize_split("969, 30, 1") == pytest.approx([0.969, 0.03, 0.001])
    assert get_split_indices(parse_and_normalize_split("969,30,1"), 100000) == \
        [0, 96900, 99900, 100000]
    # megatron-core 0.16 rounds each cumulative fraction: 1/3 -> 3, 2/3 -> 7
    assert get_split_indices(parse_and_normalize_split("1,1,1"), 10) == [0, 3, 7, 10]
    for bad in ("a,b", "0,0,0", "1,2,3,4", "-1,2"):
        with pytest.raises(ValueError, match="split="):
            parse_and_normalize_split(bad)


def test_sampler_slices_global_batches_by_rank():
    ranks = [list(MegatronPretrainingSampler(20, 4, 2, r, 2)) for r in range(2)]
    assert ranks[0][:2] == [[4, 5], [8, 9]] and ranks[1][:2] == [[6, 7], [10, 11]]
    assert len(ranks[0]) == 4  # (20 - 4) // 4 full global micro-batches
