"""BlendedDataset: samples drawn from several datasets in Megatron's greedy blending order."""

from array import array
from typing import List, Optional, Sequence

import numpy as np
import torch

from megatron.core.datasets.cache import cached_indices
from megatron.core.datasets.utils import DataError, normalize


def build_blending_indices(weights: Sequence[float], size: int):
    """Megatron's greedy order: sample i comes from the dataset furthest behind its share,
    argmax_j(w_j * max(i, 1) - count_j), the first such dataset on ties.

    Returns (dataset_index int16[size], dataset_sample_index int64[size]). A plain loop (the
    order is inherently sequential): about a second per million samples, cached afterwards.
    """
    weights = [float(w) for w in weights]
    counts = [0] * len(weights)
    which, nth = array("h", bytes(2 * size)), array("q", bytes(8 * size))
    others = range(1, len(weights))
    w0 = weights[0]
    for i in range(size):
        t = float(i) if i > 0 else 1.0
        best, best_error = 0, w0 * t - counts[0]
        for j in others:
            error = weights[j] * t - counts[j]
            if error > best_error:
                best, best_error = j, error
        which[i] = best
        nth[i] = counts[best]
        counts[best] += 1
    return np.frombuffer(which, dtype=np.int16), np.frombuffer(nth, dtype=np.int64)


def build_exhaustive_blending_indices(sizes: Sequence[int]):
    """Every sample of every dataset once, interleaved in proportion to the sizes."""
    total = int(sum(sizes))
    weights = [s / total for s in sizes]
    counts, unspent = [0] * len(sizes), [j for j, s in enumerate(sizes) if s > 0]
    which, nth = np.zeros(total, np.int16), np.zeros(total, np.int64)
    for i in range(total):
        t = max(float(i), 1.0)
        best = max(unspent, key=lambda j: (weights[j] * t - counts[j], -j))
        which[i], nth[i] = best, counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
    return which, nth


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` by ``weights`` (normalized when ``size`` is
    given; with ``size`` None, integer weights are the number of samples from each)."""

    def __init__(self, datasets: List, weights: Sequence[float], size: Optional[int],
                 path_to_cache: Optional[str] = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset needs one weight per dataset")
        self.datasets = datasets
        self.weights = normalize(weights) if size is not None else [int(w) for w in weights]
        self.size = size
        split = datasets[0].index_split
        description = {"class": type(self).__name__, "index_split": split.name,
                       "datasets": [d._description() for d in datasets],
                       "weights": self.weights, "size": size}
        build = (lambda: build_blending_indices(self.weights, size)) if size is not None \
            else (lambda: build_exhaustive_blending_indices(self.weights))
        self.dataset_index, self.dataset_sample_index = cached_indices(
            description, path_to_cache, build, ("dataset_index", "dataset_sample_index"))
        self._check_sizes()

    def _check_sizes(self) -> None:
        needed = np.bincount(np.asarray(self.dataset_index), minlength=len(self.datasets))
        for dataset, n in zip(self.datasets, needed):
            if n > len(dataset):
                raise DataError(f"the blend draws {n} samples from {dataset.dataset_path} but "
                                f"it was built with {len(dataset)}.")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int):
        dataset_id = int(self.dataset_index[idx])
        sample = self.datasets[dataset_id][int(self.dataset_sample_index[idx])]
        return {"dataset_id": dataset_id, **sample}
