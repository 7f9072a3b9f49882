"""Process groups for tensor, context, pipeline, data and embedding parallelism.

Ranks are laid out as Megatron-LM lays them out (its default order tp-cp-ep-dp-pp):
tensor-parallel ranks are adjacent, then context-parallel, then data-parallel, then
pipeline-parallel, so that for world size W = TP * CP * DP * PP

    rank = tp_rank + TP * (cp_rank + CP * (dp_rank + DP * pp_rank))

The ranks of a context-parallel group hold the same parameters and different parts of each
sequence, so gradients are reduced (and the distributed optimizer shards) over data x context
parallel ranks -- ``get_data_parallel_group(with_context_parallel=True)`` -- while the data
loader splits the batch over data-parallel ranks only.

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
_DATA_CONTEXT_GROUP = None
_CONTEXT_GROUP = None
_MODEL_GROUP = None
_EMBEDDING_GROUP = None
_TENSOR_AND_DATA_GROUP = None
_PIPELINE_GLOBAL_RANKS: Optional[List[int]] = None
_EMBEDDING_GLOBAL_RANKS: Optional[List[int]] = None
_DATA_GLOBAL_RANKS: Optional[List[int]] = None
_CONTEXT_GLOBAL_RANKS: Optional[List[int]] = None
_SIZES = {"tp": 1, "pp": 1, "dp": 1, "cp": 1}
_VIRTUAL = {"rank": None, "size": None}


def check_parallel_sizes(world_size: int, tensor_model_parallel_size: int,
                         pipeline_model_parallel_size: int,
                         context_parallel_size: int = 1) -> int:
    """Return the data-parallel size, or raise ConfigError when the sizes do not divide."""
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if tp < 1 or pp < 1 or cp < 1:
        raise ConfigError(
            f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp} and "
            f"context_parallel_size={cp} must all be at least 1.")
    if world_size % (tp * pp * cp) != 0:
        sizes = f"tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp}"
        if cp > 1:
            sizes += f" x context_parallel_size={cp}"
        raise ConfigError(f"world size {world_size} is not divisible by {sizes}; launch a "
                          f"multiple of {tp * pp * cp} processes.")
    return world_size // (tp * pp * cp)


def rank_groups(world_size: int, tp: int, pp: int, cp: int = 1) -> dict:
    """The rank lists of every group kind, in Megatron's order (pure; used by tests too)."""
    dp = world_size // (tp * pp * cp)
    rank = lambda t, c, d, p: t + tp * (c + cp * (d + dp * p))  # noqa: E731
    T, C, D, P = range(tp), range(cp), range(dp), range(pp)
    groups = {
        "tp": [[rank(t, c, d, p) for t in T] for p in P for d in D for c in C],
        "cp": [[rank(t, c, d, p) for c in C] for p in P for d in D for t in T],
        "dp": [[rank(t, c, d, p) for d in D] for p in P for c in C for t in T],
        "dp_cp": [[rank(t, c, d, p) for d in D for c in C] for p in P for t in T],
        "pp": [[rank(t, c, d, p) for p in P] for d in D for c in C for t in T],
        "mp": [[rank(t, c, d, p) for p in P for t in T] for d in D for c in C],
        "tp_dp_cp": [[rank(t, c, d, p) for d in D for c in C for t in T] for p in P],
    }
    groups["embedding"] = [sorted({g[0], g[-1]}) for g in groups["pp"]]
    return groups


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              timeout_minutes: Optional[float] = None,
                              context_parallel_size: int = 1) -> None:
    """Create the tensor, context, pipeline, data, model and embedding groups.

    Must be called on every rank of the default process group, after
    ``torch.distributed.init_process_group``; every rank creates every group, in the same order.
    """
    global _TENSOR_GROUP, _PIPELINE_GROUP, _DATA_GROUP, _MODEL_GROUP, _EMBEDDING_GROUP
    global _PIPELINE_GLOBAL_RANKS, _EMBEDDING_GLOBAL_RANKS, _DATA_GLOBAL_RANKS
    global _TENSOR_AND_DATA_GROUP, _DATA_CONTEXT_GROUP, _CONTEXT_GROUP, _CONTEXT_GLOBAL_RANKS
    world, me = dist.get_world_size(), dist.get_rank()
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    dp = check_parallel_sizes(world, tp, pp, cp)
    kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    found = {}
    for kind, rank_lists in rank_groups(world, tp, pp, cp).items():
        for ranks in rank_lists:
            group = dist.new_group(ranks, **kwargs)
            if me in ranks:
                found[kind] = (group, ranks)
    _TENSOR_GROUP = found["tp"][0]
    _DATA_GROUP, _DATA_GLOBAL_RANKS = found["dp"]
    _PIPELINE_GROUP, _PIPELINE_GLOBAL_RANKS = found["pp"]
    _DATA_CONTEXT_GROUP = found["dp_cp"][0]
    _CONTEXT_GROUP, _CONTEXT_GLOBAL_RANKS = found["cp"]
    _MODEL_GROUP = found["mp"][0]
    _TENSOR_AND_DATA_GROUP = found["tp_dp_cp"][0]
    _EMBEDDING_GROUP, _EMBEDDING_GLOBAL_RANKS = found.get("embedding", (None, None))
    _SIZES.update(tp=tp, pp=pp, dp=dp, cp=cp)


def model_parallel_is_initialized() -> bool:
    return _TENSOR_GROUP is not None


def destroy_model_parallel() -> None:
    """Forget all groups (the default process group is left to the caller)."""
    global _TENSOR_GROUP, _PIPELINE_GROUP, _DATA_GROUP, _MODEL_GROUP, _EMBEDDING_GROUP
    global _PIPELINE_GLOBAL_RANKS, _EMBEDDING_GLOBAL_RANKS, _DATA_GLOBAL_RANKS
    global _TENSOR_AND_DATA_GROUP, _DATA_CONTEXT_GROUP, _CONTEXT_GROUP, _CONTEXT_GLOBAL_RANKS
    _TENSOR_GROUP = _PIPELINE_GROUP = _DATA_GROUP = _MODEL_GROUP = _EMBEDDING_GROUP = None
    _TENSOR_AND_DATA_GROUP = _DATA_CONTEXT_GROUP = _CONTEXT_GROUP = None
    _PIPELINE_GLOBAL_RANKS = _EMBEDDING_GLOBAL_RANKS = _DATA_GLOBAL_RANKS = None
    _CONTEXT_GLOBAL_RANKS = None
    _SIZES.update(tp=1, pp=1, dp=1, cp=1)
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


# --- context parallel ------------------------------------------------------------------------
def get_context_parallel_group():
    return _CONTEXT_GROUP


def get_context_parallel_world_size() -> int:
    return _SIZES["cp"]


def get_context_parallel_rank() -> int:
    return _rank_in(_CONTEXT_GROUP)


def get_context_parallel_global_ranks() -> List[int]:
    return _CONTEXT_GLOBAL_RANKS or [0]


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
def get_data_parallel_group(with_context_parallel: bool = False):
    """The ranks holding the same model shard and different micro-batches; with
    ``with_context_parallel`` also those holding other parts of the same sequences: the group
    gradients are reduced over and the distributed optimizer shards over."""
    return _DATA_CONTEXT_GROUP if with_context_parallel else _DATA_GROUP


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    return _SIZES["dp"] * (_SIZES["cp"] if with_context_parallel else 1)


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    return _rank_in(_DATA_CONTEXT_GROUP if with_context_parallel else _DATA_GROUP)


def get_data_parallel_src_rank() -> int:
    """Global rank of data-parallel rank 0 in this rank's data-parallel group."""
    return (_DATA_GLOBAL_RANKS or [0])[0]


def get_tensor_and_data_parallel_group():
    """The ranks of this pipeline stage (tensor x context x data parallel): where FP8 amaxes
    are reduced."""
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

