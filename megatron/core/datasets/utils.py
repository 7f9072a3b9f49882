"""Train/valid/test splits as Megatron-LM computes them."""

import enum
import re
from typing import List, Optional, Tuple

import numpy as np

from megatron.core import ConfigError


class DataError(ValueError):
    """A data file or data flag that cannot be used; the message names the path and reason."""


class Split(enum.Enum):
    train = 0
    valid = 1
    test = 2


def normalize(weights: List[float]) -> List[float]:
    """Weights scaled to sum to 1 (float64, as megatron-core does it)."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def parse_and_normalize_split(split: str) -> List[float]:
    """'969,30,1' -> [0.969, 0.03, 0.001]; missing parts count as 0."""
    try:
        # quotes: launch scripts pass "--split '99,1,0'" through word splitting, quotes kept
        parts = [float(p) for p in re.split(r"[,/\s]+", split.strip().strip("'\"")) if p]
    except ValueError:
        raise ConfigError(f"split={split} is not a comma-separated list of numbers, e.g. "
                          "969,30,1.") from None
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"split={split} must be one to three non-negative weights with a "
                          "positive sum, e.g. 969,30,1.")
    return normalize(parts + [0.0] * (3 - len(parts)))


def get_split_indices(split: List[float], num_elements: int) -> List[int]:
    """Boundaries [0, a, b, num_elements] of the three splits over ``num_elements`` documents:
    round(cumulative fraction x num_elements), as megatron-core's split matrix gives them."""
    bounds, total = [0.0], 0.0
    for fraction in split:
        total = total + fraction
        bounds.append(total)
    return [int(round(b * float(num_elements))) for b in bounds]


def parse_blend(words: List[str], flag: str = "data_path"
                ) -> Tuple[List[str], Optional[List[float]]]:
    """``[w1, p1, w2, p2, ...]`` -> (prefixes, weights); ``[p1, p2, ...]`` -> (prefixes, None),
    meaning weights in proportion to the datasets' sizes."""
    if not words:
        raise ConfigError(f"{flag} is empty; give a dataset prefix or weight/prefix pairs.")

    def as_weight(word):
        try:
            return float(word)
        except ValueError:
            return None
    if as_weight(words[0]) is None:
        bad = [w for w in words if as_weight(w) is not None]
        if bad:
            raise ConfigError(f"{flag} mixes weights ({bad[0]}) with unweighted prefixes; give "
                              "either 'w1 prefix1 w2 prefix2 ...' or 'prefix1 prefix2 ...'.")
        return list(words), None
    if len(words) % 2:
        raise ConfigError(f"{flag} has {len(words)} words; weighted blends need weight/prefix "
                          "pairs.")
    weights, prefixes = [], []
    for weight, prefix in zip(words[::2], words[1::2]):
        value = as_weight(weight)
        if value is None or value < 0 or not np.isfinite(value):
            raise ConfigError(f"{flag} weight {weight!r} (before {prefix}) is not a "
                              "non-negative number.")
        weights.append(value)
        prefixes.append(prefix)
    if sum(weights) <= 0:
        raise ConfigError(f"{flag} weights sum to zero; at least one dataset needs a positive "
                          "weight.")
    return prefixes, weights
