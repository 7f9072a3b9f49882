"""Training: flags, start-up, the loop, checkpoints, schedules, logging."""

from megatron.core.timers import get_timers
from megatron.training.global_vars import get_args, get_tokenizer
from megatron.training.log_writers import get_tensorboard_writer, get_wandb_writer
from megatron.training.training import pretrain
from megatron.training.utils import print_rank_0
