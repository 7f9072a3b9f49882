"""Start-up: flags, tokenizer, process groups, seeds, in the order that keeps errors cheap."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron.core import ConfigError, parallel_state
from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.tokenizers import build_tokenizer, vocab_size_with_padding
from megatron.training import global_vars
from megatron.training.arguments import (
    ArgumentError,
    config_error_to_flags,
    exit_with_error,
    parse_args,
    validate_args,
)
from megatron.training.checkpointing import CheckpointError, load_args_from_checkpoint
from megatron.training.host_memory import reuse_freed_memory
from megatron.training.megatron_lm_flags import print_startup_notes
from megatron.training.utils import print_rank_0


def initialize_megatron(extra_args_provider=None, args_defaults=None, argv=None):
    """Parse and validate flags, build the tokenizer, create the process groups, seed.

    Every user error is reported (one line, exit status 2) before any process group exists.
    """
    try:
        args = parse_args(argv, extra_args_provider)
        for key, value in (args_defaults or {}).items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        if args.use_checkpoint_args:
            try:
                load_args_from_checkpoint(args)
            except CheckpointError as e:
                raise ArgumentError(str(e)) from None
        validate_args(args)
        tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file,
                                    merge_file=args.merge_file,
                                    tokenizer_model=args.tokenizer_model,
                                    vocab_size=args.vocab_size)
    except ConfigError as e:
        exit_with_error(ArgumentError(config_error_to_flags(str(e), args)))
    except ArgumentError as e:
        exit_with_error(e)
    args.true_vocab_size = tokenizer.vocab_size  # checkpoint tools trim the padding with it
    args.padded_vocab_size = vocab_size_with_padding(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    print_startup_notes(args)
    reused = args.host_memory_reuse and not torch.cuda.is_available() and reuse_freed_memory()
    global_vars.set_args(args)
    global_vars.set_tokenizer(tokenizer)
    init_num_microbatches_calculator(args.rank, args.rampup_batch_size, args.global_batch_size,
                                     args.micro_batch_size, args.data_parallel_size,
                                     step_batch_size_schedule=args.step_batch_size_schedule,
                                     seq_length=args.seq_length)
    _initialize_distributed(args)
    print_rank_0(f" > padded vocab (size: {tokenizer.vocab_size}) with "
                 f"{args.padded_vocab_size - tokenizer.vocab_size} dummy tokens (new size: "
                 f"{args.padded_vocab_size})")
    if reused:
        print_rank_0(" > host memory: freed memory kept for the next step (glibc malloc without "
                     "mmap or trimming; --no-host-memory-reuse turns this off)")
    set_random_seed(args.seed)
    return args


def _initialize_distributed(args) -> None:
    """Join the torchrun process group (when launched by torchrun) and build the groups."""
    if torch.cuda.is_available():  # one process per GPU: torchrun's LOCAL_RANK picks it
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.init()  # the RNG tracker and checkpoints then hold CUDA generator states
    if "WORLD_SIZE" not in os.environ:  # plain `python pretrain_gpt.py`: one process
        return
    if not dist.is_initialized():
        dist.init_process_group(backend=args.distributed_backend,
                                timeout=timedelta(minutes=args.distributed_timeout_minutes))
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size,
                                             args.pipeline_model_parallel_size,
                                             args.distributed_timeout_minutes,
                                             args.context_parallel_size)
    parallel_state.set_virtual_pipeline_model_parallel_world_size(
        args.virtual_pipeline_model_parallel_size)


def destroy_distributed() -> None:
    """Leave the process group cleanly at the end of a script: a gloo group still alive at
    interpreter exit can abort the process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def get_device() -> torch.device:
    """Where this rank's model and batches live: its GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
