from megatron.core.distributed.distributed_data_parallel import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
)
