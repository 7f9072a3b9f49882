"""Training: flags, start-up, the loop, checkpoints, schedules, logging."""

from megatron.training.global_vars import get_args, get_tokenizer
from megatron.training.training import pretrain
from megatron.training.utils import print_rank_0
