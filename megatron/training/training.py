"""pretrain(): set up, train with periodic evaluation and checkpoints, evaluate at the end."""

import math
import signal
import time
from datetime import datetime
from functools import partial

import torch

from megatron.core import ConfigError
from megatron.core import parallel_state as ps
from megatron.core.datasets.samplers import MegatronPretrainingSampler
from megatron.core.datasets.utils import DataError
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
    sync_shared_embeddings,
)
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.training import checkpointing
from megatron.training.arguments import exit_with_error, optimizer_config_from_args
from megatron.training.initialize import get_device, initialize_megatron
from megatron.training.learning_rates import OptimizerParamScheduler
from megatron.training.utils import print_rank_0, print_rank_last


def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
             extra_args_provider=None, args_defaults=None, argv=None):
    """Megatron-LM's entry point: ``model_provider(pre_process, post_process)`` builds the
    model, ``train_valid_test_dataset_provider([n_train, n_valid, n_test])`` the datasets,
    ``forward_step_func(data_iterator, model)`` one micro-batch's output and loss function.
    ``model_type`` is accepted for signature compatibility (decoder-only models only)."""
    args = initialize_megatron(extra_args_provider, args_defaults, argv)
    start_time = _agreed_start_time()
    exit_signal = _ExitSignal(args) if args.exit_signal_handler else None
    checkpoint = _open_checkpoint(args)  # user errors before the model is built
    model, optimizer, scheduler = setup_model_and_optimizer(model_provider, args)
    args.iteration, args.consumed_train_samples, args.consumed_valid_samples = 0, 0, 0
    if checkpoint is not None:
        args.iteration = _exit_on_checkpoint_error(
            checkpointing.load_checkpoint, checkpoint, model, optimizer, scheduler, args)
        del checkpoint  # release the memory-mapped files
    iterators = build_data_iterators(train_valid_test_dataset_provider, args)
    print_rank_0(f"[after dataloaders are built] datetime: {_now()}")
    try:
        iteration, exiting = train(forward_step_func, model, optimizer, scheduler, iterators,
                                   args, start_time, exit_signal)
        if not exiting:
            if args.eval_iters > 0:
                for name, data_iterator in (("validation", iterators[1]),
                                            ("test", iterators[2])):
                    if data_iterator is not None:
                        evaluate_and_print_results(f"iteration {iteration} on {name} set",
                                                   forward_step_func, data_iterator, model, args)
            if args.save and (args.save_interval is None or iteration % args.save_interval):
                checkpointing.save_checkpoint(iteration, model, optimizer, scheduler, args)
        _exit_on_checkpoint_error(checkpointing.finalize_async_save, True)
    finally:
        if exit_signal is not None:
            exit_signal.restore()


def _agreed_start_time() -> float:
    """The earliest start time over all ranks (what --exit-duration-in-mins counts from)."""
    start = torch.tensor([time.time()], dtype=torch.float64)
    if torch.distributed.is_initialized():
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        start = start.to(device)
        torch.distributed.all_reduce(start, op=torch.distributed.ReduceOp.MIN)
    return float(start.item())


class _ExitSignal:
    """--exit-signal-handler: remember that --exit-signal arrived; the loop saves and exits at
    the end of the iteration in which any rank received it."""

    def __init__(self, args):
        self.signum = getattr(signal, args.exit_signal)
        self.received = False
        self.previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank_received(self) -> bool:
        return checkpointing.all_ranks_agree(self.received, "max")

    def restore(self) -> None:
        signal.signal(self.signum, self.previous)


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _exit_on_checkpoint_error(fn, *a):
    try:
        return fn(*a)
    except checkpointing.CheckpointError as e:
        exit_with_error(e)


def _open_checkpoint(args):
    """The checkpoint reader to resume from, None to start fresh; exits on a bad one."""
    if not args.load:
        return None
    return _exit_on_checkpoint_error(checkpointing.open_checkpoint, args)


def setup_model_and_optimizer(model_provider, args):
    """This rank's model chunks (one, or one per virtual pipeline stage) on its device, each
    wrapped for gradient accumulation and reduction; AdamW; the learning-rate schedule."""
    vp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for k in range(vp or 1):
        ps.set_virtual_pipeline_model_parallel_rank(k if vp else None)
        chunks.append(model_provider(pre_process=ps.is_pipeline_first_stage(),
                                     post_process=ps.is_pipeline_last_stage()))
    ps.set_virtual_pipeline_model_parallel_rank(None)
    n_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    if ps.get_data_parallel_rank() == 0:
        print(f" > number of parameters on (tensor, pipeline) model parallel rank "
              f"({ps.get_tensor_model_parallel_rank()}, "
              f"{ps.get_pipeline_model_parallel_rank()}): {n_params}", flush=True)
    ddp_config = DistributedDataParallelConfig(
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=args.ddp_bucket_size)
    chunks = [DistributedDataParallel(ddp_config, chunk.to(get_device())) for chunk in chunks]
    sync_shared_embeddings([chunk.module for chunk in chunks])
    optimizer = get_megatron_optimizer(optimizer_config_from_args(args), chunks)
    scheduler = build_scheduler(optimizer, args)
    return chunks, optimizer, scheduler


def build_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Megatron counts schedule steps in samples when training by iterations."""
    gbs = args.global_batch_size
    decay_steps = args.lr_decay_iters * gbs
    warmup_steps = int(args.lr_warmup_fraction * decay_steps) \
        if args.lr_warmup_fraction is not None else args.lr_warmup_iters * gbs
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style, weight_decay=args.weight_decay,
        wsd_decay_steps=(args.lr_wsd_decay_iters or 0) * gbs,
        lr_wsd_decay_style=args.lr_wsd_decay_style)


def build_data_iterators(provider, args):
    """Train, valid and test iterators sized as Megatron sizes them, each starting at the
    sample after the last one consumed."""
    gbs = args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters
    try:
        datasets = provider([args.train_iters * gbs, evals * gbs, args.eval_iters * gbs])
    except (ConfigError, DataError) as e:  # data that cannot make the requested samples
        exit_with_error(e)
    consumed = (args.consumed_train_samples, args.consumed_valid_samples, 0)
    iterators = []
    for dataset, start in zip(datasets, consumed):
        if dataset is None or len(dataset) == 0:
            iterators.append(None)
            continue
        # one iterator per model chunk: each chunk sees every micro-batch once
        per_chunk = []
        for _ in range(args.virtual_pipeline_model_parallel_size or 1):
            sampler = MegatronPretrainingSampler(len(dataset), start, args.micro_batch_size,
                                                 ps.get_data_parallel_rank(),
                                                 ps.get_data_parallel_world_size())
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, num_workers=args.num_workers,
                pin_memory=torch.cuda.is_available(), persistent_workers=args.num_workers > 0,
                generator=torch.Generator(),  # keeps the default RNG (dropout) untouched
                worker_init_fn=partial(_ignore_signal, args.exit_signal)
                if args.exit_signal_handler else None)
            per_chunk.append(iter(loader))
        iterators.append(per_chunk)
    return iterators


def _ignore_signal(name: str, worker_id: int) -> None:
    """In data-loader workers under --exit-signal-handler: the exit signal (which torchrun and
    SLURM send to every process) is the main process's to handle; the workers stop when it
    does."""
    signal.signal(getattr(signal, name), signal.SIG_IGN)


def _schedule_kwargs(args) -> dict:
    """What the pipeline schedule sends between stages: [seq (/ tp under SP), mbs, hidden]."""
    seq = args.seq_length // args.tensor_model_parallel_size if args.sequence_parallel \
        else args.seq_length
    return {"tensor_shape": (seq, args.micro_batch_size, args.hidden_size),
            "dtype": args.params_dtype}


def train_step(forward_step_func, data_iterator, model, optimizer, scheduler, args):
    """One global batch: micro-batches forward/backward, gradient reduction, optimizer step.
    Returns ({loss name: mean over micro-batches}, skipped (0/1), grad norm or None)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    reported = get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
        num_microbatches=args.num_microbatches, grad_scale_func=optimizer.scale_loss,
        **_schedule_kwargs(args))
    finalize_model_grads(model)
    update_successful, grad_norm = optimizer.step()
    if update_successful:
        scheduler.step(increment=args.global_batch_size)
    losses = {key: torch.stack([r[key] for r in reported]).mean()
              for key in (reported[0] if reported else {})}  # only the last stage has losses
    return losses, int(not update_successful), grad_norm


def train(forward_step_func, model, optimizer, scheduler, iterators, args, start_time=None,
          exit_signal=None):
    """The training loop; returns (last iteration, whether it stopped early: an exit signal,
    --exit-duration-in-mins or --exit-interval, each after saving a checkpoint)."""
    train_iterator, valid_iterator = iterators[0], iterators[1]
    for chunk in model:
        chunk.train()
    iteration = args.iteration
    stats = _IntervalStats()
    print_rank_0(f"[before the start of training step] datetime: {_now()}")
    while iteration < args.train_iters:
        losses, skipped, grad_norm = train_step(forward_step_func, train_iterator, model,
                                                optimizer, scheduler, args)
        iteration += 1
        args.iteration = iteration
        args.consumed_train_samples += args.global_batch_size
        stats.add(losses, skipped)
        if iteration % args.log_interval == 0:
            training_log(stats, iteration, grad_norm, optimizer, args)
            stats = _IntervalStats()
        if valid_iterator is not None and args.eval_iters > 0 and \
                iteration % args.eval_interval == 0:
            evaluate_and_print_results(f"iteration {iteration}", forward_step_func,
                                       valid_iterator, model, args)
        if args.async_save:
            _exit_on_checkpoint_error(checkpointing.finalize_async_save)
        saved = False

        def save():
            checkpointing.save_checkpoint(iteration, model, optimizer, scheduler, args)
            return True
        if exit_signal is not None and exit_signal.any_rank_received():
            if args.save:
                save()
            print_rank_0(f"exiting program after receiving {args.exit_signal} at iteration "
                         f"{iteration}")
            return iteration, True
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            saved = save()
        if args.exit_duration_in_mins is not None:
            minutes = (time.time() - start_time) / 60.0
            if checkpointing.all_ranks_agree(minutes > args.exit_duration_in_mins, "max"):
                if args.save and not saved:
                    save()
                print_rank_0(f"exiting program after {minutes:.2f} minutes at iteration "
                             f"{iteration}")
                return iteration, True
        if args.exit_interval and iteration % args.exit_interval == 0:
            if args.save and not saved:
                save()
            print_rank_0(f"exiting program at iteration {iteration}")
            return iteration, True
    return iteration, False


class _IntervalStats:
    """Losses and counters accumulated between two log lines."""

    def __init__(self):
        self.start = time.time()
        self.losses, self.iterations, self.skipped, self.nan = {}, 0, 0, 0

    def add(self, losses, skipped):
        self.iterations += 1
        self.skipped += skipped
        if any(not math.isfinite(float(v)) for v in losses.values()):
            self.nan += 1
            return
        if skipped:
            return
        for key, value in losses.items():
            self.losses[key] = self.losses.get(key, 0.0) + float(value)


def training_log(stats: _IntervalStats, iteration, grad_norm, optimizer, args) -> None:
    """Megatron-LM's log line, printed by the last rank (where the loss lives)."""
    elapsed_ms = (time.time() - stats.start) * 1000.0 / max(stats.iterations, 1)
    lr = optimizer.param_groups[0]["lr"]
    line = f" [{_now()}] iteration {iteration:8d}/{args.train_iters:8d} |"
    line += f" consumed samples: {args.consumed_train_samples:12d} |"
    line += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    line += f" learning rate: {lr:.6E} |"
    line += f" global batch size: {args.global_batch_size:5d} |"
    counted = max(stats.iterations - stats.skipped - stats.nan, 1)
    for key, total in stats.losses.items():
        line += f" {key}: {total / counted:.6E} |"
    line += f" loss scale: {optimizer.get_loss_scale():.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {stats.skipped:3d} |"
    line += f" number of nan iterations: {stats.nan:3d} |"
    print_rank_last(line)


@torch.no_grad()
def evaluate(forward_step_func, data_iterator, model, args):
    """Mean of each reported loss over --eval-iters global batches (dropout off)."""
    for chunk in model:
        chunk.eval()
    totals, count = {}, 0
    for _ in range(args.eval_iters):
        reported = get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
            num_microbatches=args.num_microbatches, forward_only=True,
            **_schedule_kwargs(args))
        for values in reported:
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += 1
        args.consumed_valid_samples += args.global_batch_size
    for chunk in model:
        chunk.train()
    return {key: total / max(count, 1) for key, total in totals.items()}


def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, args) -> dict:
    losses = evaluate(forward_step_func, data_iterator, model, args)
    line = f" validation loss at {prefix} | "
    for key, value in losses.items():
        line += f"{key} value: {value:.6E} | {key} PPL: {math.exp(min(20.0, value)):.6E} | "
    print_rank_last("-" * (len(line) + 1))
    print_rank_last(line)
    print_rank_last("-" * (len(line) + 1))
    return losses
