"""Batch samplers that hand each data-parallel rank its slice of every global micro-batch."""

from typing import Iterator, List


class MegatronPretrainingSampler:
    """Sequential sample ids from ``consumed_samples`` on; each yield is this data-parallel
    rank's ``micro_batch_size`` ids out of the next ``micro_batch_size x dp_size``.

    Starting from ``consumed_samples`` is what lets a resumed run continue with the very
    next sample.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.drop_last = micro_batch_size, drop_last
        self.rank, self.size = data_parallel_rank, data_parallel_size

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        width = self.micro_batch_size * self.size
        start = self.rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples, width):
            batch = list(range(first, min(first + width, self.total_samples)))
            if len(batch) < width and self.drop_last:
                return
            yield batch[start:start + self.micro_batch_size]
