"""Process groups for tensor, pipeline, data and embedding parallelism.

Ranks are laid out as Megatron-LM lays them out: tensor-parallel ranks are adjacent, then
data-parallel, then pipeline-parallel, so that for world size W = TP * DP * PP

    rank = tp_rank + TP * (dp_rank + DP * pp_rank)

Every getter works before :func:`initialize_model_parallel` is called (or without
``torch.distributed`` at all) and then describes a single process: sizes 1, ranks 0,
groups ``None``. Collectives in this package short-circuit when their group's size is 1.
"""

from __future__ import annotations

from datetime import timedelta
from typing import List, Optional

import torch.distributed as dist

from megatron.core import ConfigError

_TENSOR_GROUP = None
_PIPELINE_GROUP = None
_DATA_GROUP = None
_MODEL_GROUP = None
_EMBEDDING_GROUP = None
_TENSOR_AND_DATA_GROUP = None
_PIPELINE_GLOBAL_RANKS: Optional[List[int]] = None
_EMBEDDING_GLOBAL_RANKS: Optional[List[int]] = None
_DATA_GLOBAL_RANKS: Optional[List[int]] = None
_SIZES = {"tp": 1, "pp": 1, "dp": 1}
_VIRTUAL = {"rank": None, "size": None}


def check_parallel_sizes(world_size: int, tensor_model_parallel_size: int,
                         pipeline_model_parallel_size: int) -> int:
    """Return the data-parallel size, or raise ConfigError when the sizes do not divide."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ConfigError(
            f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} "
            "must both be at least 1.")
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size={tp} x "
            f"pipeline_model_parallel_size={pp}; launch a multiple of {tp * pp} processes.")
    return world_size // (tp * pp)


def rank_groups(world_size: int, tp: int, pp: int) -> dict:
    """The rank lists of every group kind, in Megatron's order (pure; used by tests too)."""
    dp = world_size // (tp * pp)
    rank = lambda t, d, p: t + tp * (d + dp * p)  # noqa: E731
    groups = {
        "tp": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "mp": [[rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)],
        "tp_dp": [[rank(t, d, p) for d in range(dp) for t in range(tp)] for p in range(pp)],
    }
    groups["embedding"] = [sorted({g[0], g[-1]}) for g in groups["pp"]]
    return groups


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              timeout_minutes: Optional[float] = None) -> None:
    """Create the tensor, pipeline, data, model and embedding groups.

    Must be called on every rank of the default process group, after
    ``torch.distributed.init_process_group``; every rank creates every group, in the same order.
    """
    global _TENSOR_GROUP, _PIPELINE_GROUP, _DATA_GROUP, _MODEL_GROUP, _EMBEDDING_GROUP
    global _PIPELINE_GLOBAL_RANKS, _EMBEDDING_GLOBAL_RANKS, _DATA_GLOBAL_RANKS
    global _TENSOR_AND_DATA_GROUP
    world, me = dist.get_world_size(), dist.get_rank()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    dp = check_parallel_sizes(world, tp, pp)
    kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    found = {}
    for kind, rank_lists in rank_groups(world, tp, pp).items():
        for ranks in rank_lists:
            group = dist.new_group(ranks, **kwargs)
            if me in ranks:
                found[kind] = (group, ranks)
    _TENSOR_GROUP = found["tp"][0]
    _DATA_GROUP, _DATA_GLOBAL_RANKS = found["dp"]
    _PIPELINE_GROUP, _PIPELINE_GLOBAL_RANKS = found["pp"]
    _MODEL_GROUP = found["mp"][0]
    _TENSOR_AND_DATA_GROUP = found["tp_dp"][0]
    _EMBEDDING_GROUP, _EMBEDDING_GLOBAL_RANKS = found.get("embedding", (None, None))
    _SIZES.update(tp=tp, pp=pp, dp=dp)


def model_parallel_is_initialized() -> bool:
    return _TENSOR_GROUP is not None


def destroy_model_parallel() -> None:
    """Forget all groups (the default process group is left to the caller)."""
    global _TENSOR_GROUP, _PIPELINE_GROUP, _DATA_GROUP, _MODEL_GROUP, _EMBEDDING_GROUP
    global _PIPELINE_GLOBAL_RANKS, _EMBEDDING_GLOBAL_RANKS, _DATA_GLOBAL_RANKS
    global _TENSOR_AND_DATA_GROUP
    _TENSOR_GROUP = _PIPELINE_GROUP = _DATA_GROUP = _MODEL_GROUP = _EMBEDDING_GROUP = None
    _TENSOR_AND_DATA_GROUP = None
    _PIPELINE_GLOBAL_RANKS = _EMBEDDING_GLOBAL_RANKS = _DATA_GLOBAL_RANKS = None
    _SIZES.update(tp=1, pp=1, dp=1)
    _VIRTUAL.update(rank=None, size=None)


def _rank_in(group) -> int:
    return dist.get_rank(group) if group is not None else 0


# --- tensor parallel -------------------------------------------------------------------------
def get_tensor_model_parallel_group():
    return _TENSOR_GROUP


def get_tensor_model_parallel_world_size() -> int:
    return _SIZES["tp"]


def get_tensor_model_parallel_rank() -> int:
    return _rank_in(_TENSOR_GROUP)


# --- pipeline parallel -----------------------------------------------------------------------
def get_pipeline_model_parallel_group():
    return _PIPELINE_GROUP


def get_pipeline_model_parallel_world_size() -> int:
    return _SIZES["pp"]


def get_pipeline_model_parallel_rank() -> int:
    return _rank_in(_PIPELINE_GROUP)


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """This rank runs the first stage (and, with virtual stages, the first chunk is current)."""
    if not ignore_virtual and _VIRTUAL["size"] and _VIRTUAL["rank"] not in (None, 0):
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """This rank runs the last stage (and, with virtual stages, the last chunk is current)."""
    if not ignore_virtual and _VIRTUAL["size"] and _VIRTUAL["rank"] is not None and \
            _VIRTUAL["rank"] != _VIRTUAL["size"] - 1:
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def get_pipeline_model_parallel_global_ranks() -> List[int]:
    return _PIPELINE_GLOBAL_RANKS or [0]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next pipeline stage (the first after the last)."""
    ranks = get_pipeline_model_parallel_global_ranks()
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous pipeline stage (the last before the first)."""
    ranks = get_pipeline_model_parallel_global_ranks()
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


def set_virtual_pipeline_model_parallel_world_size(size: Optional[int]) -> None:
    _VIRTUAL["size"] = size


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return _VIRTUAL["size"]


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    """The model chunk being built or run on this rank (interleaved schedule)."""
    _VIRTUAL["rank"] = rank


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return _VIRTUAL["rank"]


# --- data parallel ---------------------------------------------------------------------------
def get_data_parallel_group():
    return _DATA_GROUP


def get_data_parallel_world_size() -> int:
    return _SIZES["dp"]


def get_data_parallel_rank() -> int:
    return _rank_in(_DATA_GROUP)


def get_data_parallel_src_rank() -> int:
    """Global rank of data-parallel rank 0 in this rank's data-parallel group."""
    return (_DATA_GLOBAL_RANKS or [0])[0]


def get_tensor_and_data_parallel_group():
    """The ranks of this pipeline stage (tensor x data parallel): where FP8 amaxes are
    reduced."""
    return _TENSOR_AND_DATA_GROUP


# --- model parallel (tensor x pipeline) and embedding ----------------------------------------
def get_model_parallel_group():
    return _MODEL_GROUP


def get_model_parallel_world_size() -> int:
    return _SIZES["tp"] * _SIZES["pp"]


def get_embedding_group():
    return _EMBEDDING_GROUP


def is_rank_in_embedding_group() -> bool:
    if _EMBEDDING_GLOBAL_RANKS is None:
        return True
    return dist.get_rank() in _EMBEDDING_GLOBAL_RANKS


def get_global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

