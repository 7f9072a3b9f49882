"""Train/valid/test GPT datasets from prefixes, blends and splits, as megatron-core builds them.

- one prefix, no weights: the prefix's documents are split by ``split`` into three
  GPTDatasets of exactly the requested sizes;
- weighted prefixes: each prefix is split likewise and asked for its share of each split
  plus 0.5% (so the blend never runs short), and a BlendedDataset draws the requested number
  of samples in Megatron's greedy order;
- unweighted prefixes: one epoch of each, blended in proportion to their sizes;
- ``blend_per_split`` (--train-data-path / --valid-data-path / --test-data-path): each split
  from its own prefixes, each prefix used whole.
"""

import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split, get_split_indices, normalize

Blend = Tuple[List[str], Optional[List[float]]]
SURPLUS = 0.005


def _cache_dir(config: GPTDatasetConfig, prefix: Optional[str]) -> Optional[str]:
    if config.path_to_cache or prefix is None:
        return config.path_to_cache
    return os.path.join(prefix, "cache", "GPTDataset_indices")  # megatron-core's default


def _split_datasets(low_level, prefix, split, sizes, config) -> List[Optional[GPTDataset]]:
    """GPTDatasets over the three document ranges of ``split`` (None where a range is empty
    or no samples are wanted)."""
    bounds = get_split_indices(split, len(low_level.sequence_lengths))
    cfg = GPTDatasetConfig(**{**config.__dict__, "path_to_cache": _cache_dir(config, prefix)})
    out = []
    for s in Split:
        begin, end = bounds[s.value], bounds[s.value + 1]
        if end <= begin or sizes[s.value] == 0:
            out.append(None)
            continue
        out.append(GPTDataset(low_level, np.arange(begin, end, dtype=np.int32), sizes[s.value],
                              s, cfg, dataset_path=prefix))
    return out


def _sizes_per_dataset(weights: Sequence[float], sizes: Sequence[int], surplus: float = 0.0):
    return [[int(math.ceil(math.ceil(size * w) * (1 + surplus))) for size in sizes]
            for w in weights]


def _blend(prefixes, weights, split, sizes, config, open_dataset) -> List[Optional[object]]:
    if len(prefixes) == 1 and weights is None:
        return _split_datasets(open_dataset(prefixes[0]), prefixes[0], split, sizes, config)
    if weights is not None:
        weights = normalize(weights)
        target = _sizes_per_dataset(weights, sizes)
        buffer = _sizes_per_dataset(weights, sizes, SURPLUS)
    else:
        target = None
        buffer = [[None if size else 0 for size in sizes] for _ in prefixes]
    parts = [_split_datasets(open_dataset(p), p, split, b, config)
             for p, b in zip(prefixes, buffer)]
    blended = []
    for s in Split:
        datasets = [part[s.value] for part in parts]
        if sizes[s.value] == 0 or any(d is None for d in datasets):
            blended.append(None)
            continue
        if weights is not None:
            size, w = sum(t[s.value] for t in target), weights
        else:
            w = [len(d) for d in datasets]
            size = min(sizes[s.value], sum(w))
        blended.append(BlendedDataset(datasets, w, size, config.path_to_cache))
    return blended


def build_gpt_datasets(config: GPTDatasetConfig, sizes: Sequence[int], split: List[float],
                       blend: Optional[Blend] = None,
                       blend_per_split: Optional[List[Optional[Blend]]] = None,
                       open_dataset: Callable = IndexedDataset) -> List[Optional[object]]:
    """[train, valid, test] datasets with ``sizes`` samples each (None for an absent split).

    Must be called on every rank: index building happens on global rank 0, the other ranks
    wait and then memory-map the cached indices.
    """
    if blend_per_split is None:
        prefixes, weights = blend
        return _blend(prefixes, weights, split, sizes, config, open_dataset)
    out = []
    for s in Split:
        if blend_per_split[s.value] is None or sizes[s.value] == 0:
            out.append(None)
            continue
        prefixes, weights = blend_per_split[s.value]
        whole = [1.0 if i == s.value else 0.0 for i in range(3)]
        only = [sizes[s.value] if i == s.value else 0 for i in range(3)]
        out.append(_blend(prefixes, weights, whole, only, config, open_dataset)[s.value])
    return out
