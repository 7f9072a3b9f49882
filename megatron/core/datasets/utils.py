"""Train/valid/test splits as Megatron-LM computes them."""

import enum
from typing import List

from megatron.core import ConfigError


class Split(enum.Enum):
    train = 0
    valid = 1
    test = 2


def parse_and_normalize_split(split: str) -> List[float]:
    """'969,30,1' -> [0.969, 0.03, 0.001]; missing parts count as 0."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"split={split} is not a comma-separated list of numbers, e.g. "
                          "969,30,1.") from None
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"split={split} must be one to three non-negative weights with a "
                          "positive sum, e.g. 969,30,1.")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def get_split_indices(split: List[float], num_elements: int) -> List[int]:
    """Boundaries [0, a, b, num_elements] of the three splits over ``num_elements`` documents."""
    bounds = [0]
    for fraction in split:
        bounds.append(bounds[-1] + int(round(fraction * float(num_elements))))
    excess = bounds[-1] - num_elements
    return [bounds[0]] + [b - excess for b in bounds[1:]]
