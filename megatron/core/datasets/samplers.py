"""Batch samplers that hand each data-parallel rank its slice of every global micro-batch."""

from typing import Iterator, List

import torch


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


class MegatronPretrainingRandomSampler:
    """Megatron-LM's sampler for ``--dataloader-type cyclic``: sample ids in an order
    shuffled once per epoch (``torch.randperm`` seeded with the epoch number), resumed at
    ``consumed_samples``. With ``data_sharding`` each data-parallel rank shuffles its own
    contiguous bucket of the dataset; without it the ranks take turns in one shuffled list.

    Iterating again after the last batch (what ``cyclic_iter`` does) starts the next epoch.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, data_sharding: bool = True):
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.data_sharding = micro_batch_size, data_sharding
        self.rank, self.size = data_parallel_rank, data_parallel_size
        self.width = micro_batch_size * data_parallel_size
        self.last_batch_size = total_samples % self.width

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        active_total_samples = self.total_samples - self.last_batch_size
        epoch = self.consumed_samples // active_total_samples
        epoch_samples = self.consumed_samples % active_total_samples
        generator = torch.Generator()
        generator.manual_seed(epoch)
        if self.data_sharding:
            bucket_size = (self.total_samples // self.width) * self.micro_batch_size
            first = self.rank * bucket_size
            order = torch.randperm(bucket_size, generator=generator).tolist()
            ids = [first + i for i in order[epoch_samples // self.size:]]
        else:
            full = (self.total_samples // self.micro_batch_size) * self.micro_batch_size
            order = torch.randperm(full, generator=generator).tolist()
            ids = order[epoch_samples:][self.rank::self.size]
        for start in range(0, len(ids) - self.micro_batch_size + 1, self.micro_batch_size):
            self.consumed_samples += self.width
            yield ids[start:start + self.micro_batch_size]
