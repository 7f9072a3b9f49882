"""Timers for the phases of a training step, with megatron-core's interface.

    timers = Timers(log_level=2, log_option="minmax")
    timers("forward-backward", log_level=1).start(barrier=True)
    ...
    timers("forward-backward").stop()
    timers.log(["forward-backward"], normalizer=log_interval)   # collective: every rank calls it

A timer whose level is above the run's ``--timing-log-level`` is one shared no-op object, so
at level 0 a call site costs a dictionary lookup. On a GPU, start and stop synchronize the
device (kernels are asynchronous), as Megatron's timers do.

Megatron-core reaches the run's timers through ``config.timers``; here core code asks
``get_timers()`` (the training loop installs the run's ``Timers`` with ``set_timers``), so the
configs stay plain dataclasses that checkpoints can hold.
"""

import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

MAX_LOG_LEVEL = 2
LOG_OPTIONS = ("max", "minmax", "all")


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


class DummyTimer:
    """What a timer above the run's level is: start and stop do nothing."""

    name = "dummy timer"

    def start(self, barrier: bool = False) -> None:
        pass

    def stop(self, barrier: bool = False) -> None:
        pass

    def reset(self) -> None:
        pass

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        raise RuntimeError("a timer above --timing-log-level measures nothing; check its "
                           "log_level")


class Timer:
    """Accumulated seconds between start() and stop() calls. ``barrier=True`` first waits for
    every rank of the global group (every rank must then call it)."""

    def __init__(self, name: str):
        self.name = name
        self._elapsed = 0.0
        self._active_time = 0.0
        self._started = False
        self._start_time = time.time()

    def start(self, barrier: bool = False) -> None:
        assert not self._started, f"timer {self.name} has already been started"
        if barrier:
            _barrier()
        _synchronize()
        self._start_time = time.time()
        self._started = True

    def stop(self, barrier: bool = False) -> None:
        assert self._started, f"timer {self.name} is not started"
        if barrier:
            _barrier()
        _synchronize()
        elapsed = time.time() - self._start_time
        self._elapsed += elapsed
        self._active_time += elapsed
        self._started = False

    def reset(self) -> None:
        self._elapsed = 0.0
        self._started = False

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """Seconds accumulated so far (a running timer keeps running); zeroed with ``reset``."""
        running = self._started
        if running:
            self.stop(barrier=barrier)
        value = self._elapsed
        if reset:
            self.reset()
        if running:
            self.start(barrier=barrier)
        return value

    def active_time(self) -> float:
        """Seconds this timer has run in total (never reset)."""
        return self._active_time


class Timers:
    """The run's timers: ``timers(name, log_level)`` creates or returns one; ``log`` and
    ``write`` gather every rank's times (all-gather over the global group)."""

    def __init__(self, log_level: int = 0, log_option: str = "minmax",
                 barrier_with_L1_time: bool = True):
        if log_option not in LOG_OPTIONS:
            raise ValueError(f"timing log option {log_option!r} is not one of {LOG_OPTIONS}")
        self._log_level, self._log_option = log_level, log_option
        self.barrier_with_L1_time = barrier_with_L1_time
        """Whether level-1 phase timers wait for all ranks (--no-barrier-with-level-1-timing)."""
        self._timers: Dict[str, Timer] = {}
        self._log_levels: Dict[str, int] = {}
        self._dummy = DummyTimer()

    def __call__(self, name: str, log_level: Optional[int] = None):
        if name in self._timers:
            assert log_level is None or log_level == self._log_levels[name], \
                f"timer {name} exists with log level {self._log_levels[name]}, not {log_level}"
            return self._timers[name]
        log_level = MAX_LOG_LEVEL if log_level is None else log_level
        assert log_level <= MAX_LOG_LEVEL, f"log level {log_level} > {MAX_LOG_LEVEL}"
        if log_level > self._log_level:
            return self._dummy
        self._timers[name] = Timer(name)
        self._log_levels[name] = log_level
        return self._timers[name]

    def _elapsed_all_ranks(self, names: List[str], reset: bool, barrier: bool
                           ) -> List[List[float]]:
        """[rank][name] seconds; 0 where a rank never ran that timer. Every rank must call it
        with the same names (all-gather over the global group)."""
        if barrier:
            _barrier()
        mine = torch.tensor([self._timers[n].elapsed(reset=reset) if n in self._timers else 0.0
                             for n in names], dtype=torch.float64)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [mine.tolist()]
        if dist.get_backend() == "nccl":
            mine = mine.cuda()
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        return [t.tolist() for t in gathered]

    def _min_max(self, names, reset, barrier, normalizer) -> Dict[str, tuple]:
        """{name: (min, max) over the ranks that ran it, divided by ``normalizer``}."""
        per_rank = self._elapsed_all_ranks(names, reset, barrier)
        out = {}
        for i, name in enumerate(names):
            times = [row[i] for row in per_rank if row[i] > 0.0]
            if times:
                out[name] = (min(times) / normalizer, max(times) / normalizer)
        return out

    def get_all_timers_string(self, names: Optional[List[str]] = None, normalizer: float = 1.0,
                              reset: bool = True, barrier: bool = False) -> Optional[str]:
        """Megatron's block: ``(min, max) time across ranks (ms):`` and one line per timer
        (``max time ...`` / ``times across ranks ...`` for the other options); None when no
        listed timer ran."""
        names = list(self._timers) if names is None else list(names)
        assert normalizer > 0.0
        if not names:
            return None
        if self._log_option == "all":
            per_rank = self._elapsed_all_ranks(names, reset, barrier)
            out = "times across ranks (ms):"
            found = False
            for i, name in enumerate(names):
                rows = [(r, row[i]) for r, row in enumerate(per_rank) if row[i] > 0.0]
                if rows:
                    found = True
                    out += f"\n  {name}:"
                    for rank, value in rows:
                        out += f"\n     rank {rank:2d}: {value * 1000.0 / normalizer:.2f}"
            return out if found else None
        times = self._min_max(names, reset, barrier, normalizer / 1000.0)
        if not times:
            return None
        max_only = self._log_option == "max"
        out = "max time across ranks (ms):" if max_only else "(min, max) time across ranks (ms):"
        for name, (low, high) in times.items():
            label = (name + " ").ljust(48, ".")
            out += f"\n    {label}: {high:.2f}" if max_only else \
                f"\n    {label}: ({low:.2f}, {high:.2f})"
        return out

    def log(self, names: List[str], rank: Optional[int] = None, normalizer: float = 1.0,
            reset: bool = True, barrier: bool = False) -> None:
        """Print the block on ``rank`` (default: the last rank). Collective."""
        text = self.get_all_timers_string(names, normalizer, reset, barrier)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        me = dist.get_rank() if world > 1 else 0
        if text is not None and me == (world - 1 if rank is None else rank):
            print(text, flush=True)

    def write(self, names: List[str], writer, iteration: int, normalizer: float = 1.0,
              reset: bool = True, barrier: bool = False) -> None:
        """``writer.add_scalar(name + "-time", max seconds over ranks / normalizer,
        iteration)`` for each timer that ran (Megatron writes the max only). Collective: every
        rank calls it, ranks without a writer pass None."""
        assert normalizer > 0.0
        times = self._min_max(names, reset, barrier, normalizer)
        if writer is not None:
            for name, (_, high) in times.items():
                writer.add_scalar(name + "-time", high, iteration)


_TIMERS = Timers(0)


def get_timers() -> Timers:
    """The run's timers (a level-0 set, which measures nothing core code asks for, until the
    training loop installs its own)."""
    return _TIMERS


def set_timers(timers: Timers) -> None:
    global _TIMERS
    _TIMERS = timers
