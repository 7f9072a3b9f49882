"""Seeding, and the RNG tracker that gives each tensor-parallel rank its own dropout stream.

Dropout on activations that every tensor-parallel rank holds whole (the residual stream)
must draw the same mask on every rank, so it uses the default generator, seeded alike.
Dropout inside a tensor-parallel region (attention probabilities, whose heads are split)
must differ per rank: it runs under ``get_rng_tracker().fork()``, which swaps in a state
seeded with the tensor-parallel rank. On GPUs the tracked states are CUDA generator states,
on CPUs the CPU generator's.
"""

import contextlib
import random

import numpy as np
import torch
import torch.utils.checkpoint

from megatron.core import parallel_state as ps

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # Megatron-LM's offset, so seeds mean the same thing there and here


def _uses_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _get_state() -> torch.Tensor:
    return torch.cuda.get_rng_state() if _uses_cuda() else torch.get_rng_state()


def _set_state(state: torch.Tensor) -> None:
    if _uses_cuda():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states that can be swapped in around a block of code."""

    def __init__(self):
        self.states = {}

    def reset(self) -> None:
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise RuntimeError(f"RNG state {name} already exists")
        saved = _get_state()
        if _uses_cuda():
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_state()
        _set_state(saved)

    def get_states(self) -> dict:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block with the named state, then store its advance and restore the default."""
        if name not in self.states:
            raise RuntimeError(f"RNG state {name} is not seeded: call "
                               "megatron.core.tensor_parallel.set_random_seed(seed) first.")
        saved = _get_state()
        _set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state()
            _set_state(saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default generator with ``seed`` and the tracker with seed + 2718 + tp_rank.

    Call on every rank after the process groups exist; ``seed`` must already include any
    per-pipeline-stage offset.
    """
    if _uses_cuda():
        torch.cuda.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + ps.get_tensor_model_parallel_rank())


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy and torch on this rank (seed + 100 x pipeline rank, as Megatron)."""
    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_manual_seed(seed)


def get_rng_state() -> dict:
    """Every generator this rank uses, in checkpointable types (tensors, numbers, strings)."""
    np_state = np.random.get_state()
    return {
        "random_rng_state": list(random.getstate()[1]),
        "random_rng_version": random.getstate()[0],
        "random_rng_gauss": random.getstate()[2],
        "np_rng_state": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]),
                         int(np_state[3]), float(np_state[4])],
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if _uses_cuda() else None,
        "rng_tracker_states": _TRACKER.get_states(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    random.setstate((state["random_rng_version"], tuple(state["random_rng_state"]),
                     state["random_rng_gauss"]))
    name, keys, pos, has_gauss, gauss = state["np_rng_state"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and _uses_cuda():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    _TRACKER.set_states(state["rng_tracker_states"])


def checkpoint(function, *args):
    """``function(*args)`` keeping only its inputs for backward (Megatron's activation
    checkpointing): the backward pass runs it again, with the random states it had the first
    time -- the default generators' and the tracker's -- so dropout draws the same masks."""
    def context_fn():
        states = _TRACKER.get_states()  # as the forward pass starts

        @contextlib.contextmanager
        def recompute():
            current = _TRACKER.get_states()
            _TRACKER.set_states(states)
            try:
                yield
            finally:
                _TRACKER.set_states(current)
        return contextlib.nullcontext(), recompute()
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             preserve_rng_state=True, context_fn=context_fn)
