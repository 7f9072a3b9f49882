"""Index arrays built once, saved as .npy files, memory-mapped by every rank afterwards."""

import hashlib
import json
import os
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch.distributed as dist


def cached_indices(description: dict, cache_dir: Optional[str], build: Callable,
                   names: Sequence[str]) -> Tuple[np.ndarray, ...]:
    """``build()``'s arrays, cached under ``cache_dir`` by the hash of ``description``.

    Global rank 0 builds and saves on a cache miss while the other ranks wait at a barrier
    (default group), then every rank memory-maps the files. Files are written under temporary
    names and renamed, so a killed build never leaves a half-written cache entry.
    """
    if cache_dir is None:
        return build()
    text = json.dumps(description, indent=4, sort_keys=True)
    base = os.path.join(cache_dir, hashlib.md5(text.encode()).hexdigest() + "-"
                        + f"{description['class']}-{description.get('index_split', '')}")
    paths = [f"{base}-{name}.npy" for name in names]
    distributed = dist.is_available() and dist.is_initialized()
    if (not distributed or dist.get_rank() == 0) and not all(map(os.path.isfile, paths)):
        arrays = build()
        os.makedirs(cache_dir, exist_ok=True)
        with open(base + "-description.txt", "w") as f:
            f.write(text)
        for path, array in zip(paths, arrays):
            with open(path + ".tmp", "wb") as f:
                np.save(f, array)
            os.replace(path + ".tmp", path)
    if distributed:
        dist.barrier()
    return tuple(np.load(path, mmap_mode="r") for path in paths)
