"""How many micro-batches make this iteration's global batch: a constant number, or a number
that grows with the samples consumed (Megatron-LM's ``--rampup-batch-size`` ramp, or its
``--step-batch-size-schedule`` steps).

Like Megatron-LM's module of the same name, one calculator per process sits behind
``get_num_microbatches()`` / ``update_num_microbatches()``, so a forward step ported from
Megatron-LM that asks for them works unchanged. The micro-batch size never changes; a
larger global batch is more micro-batches.
"""

from typing import List, Optional, Sequence, Tuple

from megatron.core import ConfigError


class ConstantNumMicroBatchesCalculator:
    """Every iteration runs ``global_batch_size / (micro_batch_size x data_parallel_size)``
    micro-batches on each data-parallel rank."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int):
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self._set(global_batch_size, consistency_check=True)

    def _set(self, global_batch_size: int, consistency_check: bool) -> None:
        width = self.micro_batch_times_data_parallel_size
        if consistency_check and (global_batch_size <= 0 or global_batch_size % width):
            raise ConfigError(
                f"global batch size {global_batch_size} is not a positive multiple of "
                f"micro_batch_size={self.micro_batch_size} x data-parallel size "
                f"{width // self.micro_batch_size} = {width}.")
        self.current_global_batch_size = global_batch_size
        self.num_micro_batches = global_batch_size // width

    def get(self) -> int:
        return self.num_micro_batches

    def get_current_global_batch_size(self) -> int:
        return self.current_global_batch_size

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        """The batch size does not depend on the samples consumed."""


class RampupBatchsizeNumMicroBatchesCalculator(ConstantNumMicroBatchesCalculator):
    """The global batch size starts at ``start_global_batch_size`` and grows by
    ``batch_size_increment`` every ``rampup_samples / ((global - start) / increment)``
    consumed samples, reaching ``global_batch_size`` once more than ``rampup_samples``
    samples are consumed (Megatron-LM's arithmetic, float division included)."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int,
                 start_global_batch_size: int, batch_size_increment: int, rampup_samples: int):
        start, increment = start_global_batch_size, batch_size_increment
        for name, value in (("start batch size", start), ("batch size increment", increment),
                            ("ramp-up samples", rampup_samples)):
            if value <= 0:
                raise ConfigError(f"rampup_batch_size {name} {value} must be positive.")
        if start >= global_batch_size:
            raise ConfigError(
                f"rampup_batch_size start batch size {start} is not below "
                f"global_batch_size={global_batch_size}; there is nothing to ramp up.")
        if (global_batch_size - start) % increment:
            raise ConfigError(
                f"rampup_batch_size increment {increment} does not divide "
                f"global_batch_size={global_batch_size} minus the start batch size {start}.")
        self.start_global_batch_size, self.batch_size_increment = start, increment
        self.rampup_samples = rampup_samples
        self.rampup_samples_per_increment = rampup_samples / (
            (global_batch_size - start) // increment)
        super().__init__(global_batch_size, micro_batch_size, data_parallel_size)
        self.update(0, consistency_check=False)

    def global_batch_size_at(self, consumed_samples: int) -> int:
        if consumed_samples > self.rampup_samples:
            return self.global_batch_size
        steps = int(consumed_samples / self.rampup_samples_per_increment)
        return self.start_global_batch_size + steps * self.batch_size_increment

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        self._set(self.global_batch_size_at(consumed_samples), consistency_check)


_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _parse_count(text: str, entry: str) -> int:
    """Megatron-LM's ``_parse_numeric_value``: a number with an optional K/M/B/T suffix."""
    text = text.strip().upper()
    scale = _SUFFIXES.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise ConfigError(f'step_batch_size_schedule entry "{entry}" has "{text}", which is not '
                          'a number with an optional K, M, B or T suffix.') from None


def parse_step_batch_size_schedule(schedule: str,
                                   seq_length: Optional[int]) -> List[Tuple[int, int]]:
    """Megatron-LM's step schedule "THRESHOLD:BATCH_SIZE ..." (spaces or commas between
    entries) as sorted (threshold in samples, global batch size) pairs. Thresholds count
    tokens when ``seq_length`` is given (as Megatron-LM's training always gives it) and are
    floored to whole samples; the first must be 0 and no two may fall on the same sample."""
    pairs = []
    for entry in schedule.replace(",", " ").split():
        if entry.count(":") != 1:
            raise ConfigError(f'step_batch_size_schedule entry "{entry}" is not '
                              'THRESHOLD:BATCH_SIZE like "0:16 2.4B:320".')
        threshold, batch_size = (_parse_count(part, entry) for part in entry.split(":"))
        if threshold < 0 or batch_size <= 0:
            raise ConfigError(f'step_batch_size_schedule entry "{entry}" needs a threshold '
                              ">= 0 and a positive global batch size.")
        pairs.append((threshold // seq_length if seq_length else threshold, batch_size))
    pairs.sort(key=lambda pair: pair[0])
    if not pairs or pairs[0][0] != 0:
        raise ConfigError(f'step_batch_size_schedule "{schedule}" does not start at threshold '
                          '0; add a first entry "0:BATCH_SIZE".')
    for (before, _), (after, _) in zip(pairs, pairs[1:]):
        if after == before:
            raise ConfigError(f'step_batch_size_schedule "{schedule}" has two thresholds at '
                              f"sample {after} (tokens are floored to whole samples of "
                              f"seq_length={seq_length}); make the thresholds distinct.")
    return pairs


class StepBatchsizeNumMicroBatchesCalculator(ConstantNumMicroBatchesCalculator):
    """The global batch size of the last schedule entry whose threshold (in samples) the
    consumed samples have reached, as in Megatron-LM's calculator of the same name."""

    def __init__(self, schedule: Sequence[Tuple[int, int]], micro_batch_size: int,
                 data_parallel_size: int):
        # Like Megatron-LM, check a size only once it is reached (update's consistency check):
        # a run resumed on more GPUs may be past entries too small for them.
        self.schedule = list(schedule)
        self.global_batch_size = self.schedule[-1][1]
        self.micro_batch_size = micro_batch_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.update(0, consistency_check=False)

    def global_batch_size_at(self, consumed_samples: int) -> int:
        return [size for threshold, size in self.schedule if consumed_samples >= threshold][-1]

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        self._set(self.global_batch_size_at(consumed_samples), consistency_check)


def build_num_microbatches_calculator(rampup_batch_size: Optional[Sequence[int]],
                                      global_batch_size: int, micro_batch_size: int,
                                      data_parallel_size: int,
                                      step_batch_size_schedule: Optional[str] = None,
                                      seq_length: Optional[int] = None):
    """A constant calculator, a ramp from ``rampup_batch_size`` = (start, increment,
    ramp-up samples), or steps from ``step_batch_size_schedule`` (which then sets every
    global batch size: ``global_batch_size`` is ignored, as in Megatron-LM)."""
    if step_batch_size_schedule is not None:
        if rampup_batch_size is not None:
            raise ConfigError("rampup_batch_size and step_batch_size_schedule were both given; "
                              "the step schedule replaces the ramp, so keep one of them.")
        return StepBatchsizeNumMicroBatchesCalculator(
            parse_step_batch_size_schedule(step_batch_size_schedule, seq_length),
            micro_batch_size, data_parallel_size)
    if rampup_batch_size is None:
        return ConstantNumMicroBatchesCalculator(global_batch_size, micro_batch_size,
                                                 data_parallel_size)
    start, increment, samples = (int(v) for v in rampup_batch_size)
    return RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size, micro_batch_size, data_parallel_size, start, increment, samples)


def train_iters_for_samples(calculator, train_samples: int) -> Tuple[int, List[int]]:
    """Megatron-LM's ``update_train_iters``: the iterations that consume ``train_samples``,
    stepping through the ramp batch by batch (its last ramp batch may pass
    ``train_samples``), then whole final-size batches (a partial last one is dropped). A step
    schedule is stepped through to the end, its last batch passing ``train_samples`` if need
    be. Returns (iterations, the global batch size of each ramp or step iteration)."""
    if isinstance(calculator, StepBatchsizeNumMicroBatchesCalculator):
        sizes, consumed = [], 0
        while consumed < train_samples:
            sizes.append(calculator.global_batch_size_at(consumed))
            consumed += sizes[-1]
        return len(sizes), sizes
    if not isinstance(calculator, RampupBatchsizeNumMicroBatchesCalculator):
        return train_samples // calculator.global_batch_size, []
    ramp, consumed = [], 0
    while consumed <= calculator.rampup_samples and consumed <= train_samples:
        ramp.append(calculator.global_batch_size_at(consumed))
        consumed += ramp[-1]
    iterations = len(ramp)
    if train_samples > consumed:
        iterations += (train_samples - consumed) // calculator.global_batch_size
    return iterations, ramp


_CALCULATOR = None


def init_num_microbatches_calculator(rank: int, rampup_batch_size, global_batch_size: int,
                                     micro_batch_size: int, data_parallel_size: int,
                                     decrease_batch_size_if_needed: bool = False,
                                     step_batch_size_schedule: Optional[str] = None,
                                     seq_length: Optional[int] = None) -> None:
    """Set this process's calculator (Megatron-LM's signature; ``rank`` is unused, and
    ``decrease_batch_size_if_needed`` is not supported). Replaces an earlier one."""
    global _CALCULATOR
    if decrease_batch_size_if_needed:
        raise ConfigError("decrease_batch_size_if_needed=True is not supported.")
    _CALCULATOR = build_num_microbatches_calculator(
        rampup_batch_size, global_batch_size, micro_batch_size, data_parallel_size,
        step_batch_size_schedule, seq_length)


def _calculator():
    if _CALCULATOR is None:
        raise RuntimeError("the number of micro-batches is not set: call "
                           "init_num_microbatches_calculator() first")
    return _CALCULATOR


def get_num_microbatches() -> int:
    return _calculator().get()


def get_current_global_batch_size() -> int:
    return _calculator().get_current_global_batch_size()


def update_num_microbatches(consumed_samples: int, consistency_check: bool = True) -> None:
    _calculator().update(consumed_samples, consistency_check)


def destroy_num_microbatches_calculator() -> None:
    global _CALCULATOR
    _CALCULATOR = None
