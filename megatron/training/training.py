"""pretrain(): set up, train with periodic evaluation and checkpoints, evaluate at the end."""

import contextlib
import gc
import math
import signal
import time
from datetime import datetime
from functools import partial

import torch

from megatron.core import ConfigError
from megatron.core import parallel_state as ps
from megatron.core.datasets.samplers import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
)
from megatron.core.datasets.utils import DataError
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
    sync_shared_embeddings,
)
from megatron.core.fp8 import fp8_metas, fp8_step
from megatron.core.num_microbatches_calculator import (
    get_num_microbatches,
    update_num_microbatches,
)
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.core.timers import get_timers
from megatron.training import checkpointing, log_writers, progress_log
from megatron.training.arguments import exit_with_error, optimizer_config_from_args
from megatron.training.flops import throughput_tflops_per_device
from megatron.training.initialize import get_device, initialize_megatron
from megatron.training.layer_stats import LayerStatsLog
from megatron.training.learning_rates import OptimizerParamScheduler
from megatron.training.update_guard import UpdateGuard
from megatron.training.utils import (
    print_rank_0,
    print_rank_last,
    reduce_losses,
    sum_loss_pairs,
)


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
    args.num_floating_point_operations_so_far = 0.0
    if checkpoint is not None:
        args.iteration = _exit_on_checkpoint_error(
            checkpointing.load_checkpoint, checkpoint, model, optimizer, scheduler, args)
        del checkpoint  # release the memory-mapped files
    progress_log.start_job(args, start_time)
    update_batch_size(args)  # a run resumed mid-ramp continues at the checkpoint's size
    iterators = build_data_iterators(train_valid_test_dataset_provider, args)
    print_rank_0(f"[after dataloaders are built] datetime: {_now()}")
    log_writers.set_log_writers(args)
    stats_log = LayerStatsLog(args, model, model[0].module.config) \
        if args.log_layer_stats else None
    try:
        with _manual_gc(args):
            iteration, exiting = train(forward_step_func, model, optimizer, scheduler,
                                       iterators, args, start_time, exit_signal, stats_log)
        for chunk in model:  # --overlap-param-gather: no all-gather left in flight
            chunk.finish_param_sync()
        if not exiting:
            if args.eval_iters > 0:
                for name, data_iterator in (("validation", iterators[1]),
                                            ("test", iterators[2])):
                    if data_iterator is not None:
                        evaluate_and_print_results(
                            f"iteration {iteration} on {name} set", forward_step_func,
                            data_iterator, model, args, stats_log if name == "validation"
                            else None)
            if args.save and (args.save_interval is None or iteration % args.save_interval):
                checkpointing.save_checkpoint(iteration, model, optimizer, scheduler, args)
        _exit_on_checkpoint_error(checkpointing.finalize_async_save, True)
    finally:
        log_writers.close_log_writers()
        if stats_log is not None:
            stats_log.close()
        if exit_signal is not None:
            exit_signal.restore()
    if exiting == "nan":
        exit_with_error(_nan_stop_message(iteration, args), status=1)


def update_batch_size(args) -> bool:
    """Set ``args.num_microbatches`` to the count for the samples consumed so far (Megatron's
    update_num_microbatches); return whether it changed."""
    before = args.num_microbatches
    try:
        update_num_microbatches(args.consumed_train_samples)
    except ConfigError as e:  # a resumed run whose ramp flags changed since the checkpoint
        exit_with_error(f"at {args.consumed_train_samples} consumed samples: {e}")
    args.num_microbatches = get_num_microbatches()
    return args.num_microbatches != before


def current_global_batch_size(args) -> int:
    return args.num_microbatches * args.micro_batch_size * args.data_parallel_size


@contextlib.contextmanager
def _manual_gc(args):
    """--manual-gc: the automatic collector is off while training, so that collections
    happen at the same iterations on every rank; it is restored afterwards."""
    if not args.manual_gc:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _gc_around_evaluation(args):
    """--manual-gc (unless --no-manual-gc-eval): collect everything before an evaluation and
    what it left behind (the youngest generation) after it, as Megatron-LM does."""
    collect = args.manual_gc and args.manual_gc_eval
    if collect:
        gc.collect()
    yield
    if collect:
        gc.collect(generation=0)


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
    if not args.load and not args.pretrained_checkpoint:
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
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
        print(f" > number of parameters on (tensor, pipeline) model parallel rank "
              f"({ps.get_tensor_model_parallel_rank()}, "
              f"{ps.get_pipeline_model_parallel_rank()}): {n_params}", flush=True)
    ddp_config = DistributedDataParallelConfig(
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
        calculate_per_token_loss=args.calculate_per_token_loss,
        grad_reduce_in_fp32=not (args.bf16 and args.grad_reduce_in_bf16),
        bucket_size=args.ddp_bucket_size)
    chunks = [DistributedDataParallel(ddp_config, chunk.to(get_device())) for chunk in chunks]
    sync_shared_embeddings([chunk.module for chunk in chunks])
    optimizer = get_megatron_optimizer(optimizer_config_from_args(args), chunks)
    scheduler = build_scheduler(optimizer, args)
    return chunks, optimizer, scheduler


def build_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Megatron counts schedule steps in samples: the --lr-*-samples lengths as they are
    under --train-samples, the --lr-*-iters lengths x the global batch size otherwise."""
    if args.train_samples is not None:
        per_unit, decay, warmup, wsd = 1, args.lr_decay_samples, args.lr_warmup_samples, \
            args.lr_wsd_decay_samples
    else:
        per_unit, decay, warmup, wsd = args.global_batch_size, args.lr_decay_iters, \
            args.lr_warmup_iters, args.lr_wsd_decay_iters
    decay_steps = decay * per_unit
    warmup_steps = int(args.lr_warmup_fraction * decay_steps) \
        if args.lr_warmup_fraction is not None else warmup * per_unit
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style, weight_decay=args.weight_decay,
        wsd_decay_steps=(wsd or 0) * per_unit, lr_wsd_decay_style=args.lr_wsd_decay_style,
        start_wd=args.start_weight_decay, end_wd=args.end_weight_decay,
        wd_incr_steps=args.train_samples or args.train_iters * args.global_batch_size,
        wd_incr_style=args.weight_decay_incr_style,
        override=args.override_opt_param_scheduler,
        use_checkpoint=args.use_checkpoint_opt_param_scheduler)


def build_data_iterators(provider, args):
    """Train, valid and test iterators sized as Megatron sizes them, each starting at the
    sample after the last one consumed."""
    gbs = args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters
    train_samples = args.train_samples if args.train_samples is not None \
        else args.train_iters * gbs
    try:
        datasets = provider([train_samples, evals * gbs, args.eval_iters * gbs])
    except (ConfigError, DataError) as e:  # data that cannot make the requested samples
        exit_with_error(e)
    if args.context_parallel_size > 1 and any(
            d is not None and len(d) > 0 and d[0].get("attention_mask") is not None
            for d in datasets):
        exit_with_error(f"--context-parallel-size {args.context_parallel_size}: the data gives "
                        "a dense [1, s, s] attention mask, which context parallelism cannot "
                        "split across ranks; give document ids or no mask.")
    consumed = (args.consumed_train_samples, args.consumed_valid_samples, 0)
    iterators = []
    for dataset, start in zip(datasets, consumed):
        if dataset is None or len(dataset) == 0:
            iterators.append(None)
            continue
        # one iterator per model chunk: each chunk sees every micro-batch once
        per_chunk = []
        for _ in range(args.virtual_pipeline_model_parallel_size or 1):
            sampler = _batch_sampler(len(dataset), start, args)
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=sampler, num_workers=args.num_workers,
                pin_memory=torch.cuda.is_available(), persistent_workers=args.num_workers > 0,
                generator=torch.Generator(),  # keeps the default RNG (dropout) untouched
                worker_init_fn=partial(_ignore_signal, args.exit_signal)
                if args.exit_signal_handler else None)
            per_chunk.append(cyclic_iter(loader) if args.dataloader_type == "cyclic"
                             else iter(loader))
        iterators.append(per_chunk)
    return iterators


def _batch_sampler(total_samples: int, consumed_samples: int, args):
    """--dataloader-type single: in order, once; cyclic: shuffled per epoch (Megatron's
    random sampler). Over this rank's slice of the data-parallel group."""
    rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if args.dataloader_type == "cyclic":
        return MegatronPretrainingRandomSampler(total_samples, consumed_samples,
                                                args.micro_batch_size, rank, size,
                                                data_sharding=args.data_sharding)
    return MegatronPretrainingSampler(total_samples, consumed_samples, args.micro_batch_size,
                                      rank, size)


def cyclic_iter(iterable):
    """Megatron's cyclic_iter: iterate again from the start (the sampler's next epoch)
    whenever the loader runs out."""
    while True:
        yield from iterable


def _ignore_signal(name: str, worker_id: int) -> None:
    """In data-loader workers under --exit-signal-handler: the exit signal (which torchrun and
    SLURM send to every process) is the main process's to handle; the workers stop when it
    does."""
    signal.signal(getattr(signal, name), signal.SIG_IGN)


def _schedule_kwargs(args) -> dict:
    """What the pipeline schedule sends between stages: [seq / cp (/ tp under SP), mbs,
    hidden]."""
    seq = args.seq_length // args.context_parallel_size
    if args.sequence_parallel:
        seq //= args.tensor_model_parallel_size
    return {"tensor_shape": (seq, args.micro_batch_size, args.hidden_size),
            "dtype": args.params_dtype}


class StepResult:
    """What one training step reports: ``losses`` ({loss name: mean over micro-batches, or
    over the global batch's tokens with --calculate-per-token-loss}; last stage only),
    ``skipped`` (the update was not applied), ``nan`` (a NaN/Inf loss or grad norm: on every
    rank when the NaN check or spike guard is on, else where the loss lives), ``spike`` (skipped
    by --skip-spiky-updates), ``grad_norm`` (None after an fp16 overflow) and ``layers`` (the
    layer statistics of a recorded step, else None)."""

    def __init__(self, losses, skipped, grad_norm, nan=False, spike=False, layers=None):
        self.losses, self.skipped, self.grad_norm = losses, int(skipped), grad_norm
        self.nan, self.spike, self.layers = bool(nan), bool(spike), layers


def train_step(forward_step_func, data_iterator, model, optimizer, scheduler, args,
               guard: UpdateGuard = None, stats_log: LayerStatsLog = None,
               fp8=None) -> StepResult:
    """One global batch: micro-batches forward/backward, gradient reduction, the guards'
    decision, optimizer step (and, every --layer-stats-interval, the layer statistics).
    ``fp8``: the model's FP8 scaling states (``fp8_metas``), updated after the step."""
    for chunk in model:
        chunk.zero_grad_buffer()
    collector = stats_log.collector if stats_log is not None and \
        stats_log.wants(args.iteration + 1) else None
    timers = get_timers()
    timers("forward-backward", log_level=1).start(barrier=timers.barrier_with_L1_time)
    if collector is not None:
        collector.start()
    try:
        reported = get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
            num_microbatches=args.num_microbatches, grad_scale_func=optimizer.scale_loss,
            calculate_per_token_loss=args.calculate_per_token_loss,
            finalize_model_grads_func=finalize_model_grads, **_schedule_kwargs(args))
    finally:
        if collector is not None:
            collector.stop()
    timers("forward-backward").stop()
    losses = reduce_losses(reported)  # only the last stage has losses
    guard_on = guard is not None and guard.active
    loss = UpdateGuard.share_loss(losses) if guard_on else None

    def before_update(grad_norm):
        if collector is not None:
            collector.record_grads(optimizer)
        return guard.should_skip(loss, grad_norm) if guard_on else False

    timers("optimizer", log_level=1).start(barrier=timers.barrier_with_L1_time)
    update_successful, grad_norm = optimizer.step(before_update)
    timers("optimizer").stop()
    if update_successful:
        scheduler.step(increment=current_global_batch_size(args))
    if fp8 is not None:  # FP8 delayed scaling: the next step's scales
        fp8_step(fp8, ps.get_data_parallel_group(with_context_parallel=True))
    if guard_on and grad_norm is None and not math.isfinite(loss):
        guard.should_skip(loss, None)  # an fp16 overflow step whose loss is NaN counts too
    layers = collector.reduce() if collector is not None else None
    if guard_on:
        nan = not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)))
    else:
        nan = any(not math.isfinite(float(v)) for v in losses.values()) or \
            (grad_norm is not None and not math.isfinite(grad_norm))
    spike = guard_on and guard.last not in (None, "nan")
    return StepResult(losses, not update_successful, grad_norm, nan, spike, layers)


def _on_batch_size_change(iteration, model, optimizer, scheduler, args) -> None:
    """Megatron-LM saves a checkpoint (with --save) whenever the ramp changes the number of
    micro-batches, unless this iteration was just saved."""
    print_rank_0(f" > ramping up global batch size to {current_global_batch_size(args)} "
                 f"({args.num_microbatches} micro-batches) after iteration {iteration}")
    if args.save and not (args.save_interval and iteration % args.save_interval == 0):
        checkpointing.save_checkpoint(iteration, model, optimizer, scheduler, args)


def train(forward_step_func, model, optimizer, scheduler, iterators, args, start_time=None,
          exit_signal=None, stats_log=None):
    """The training loop; returns (last iteration, why it stopped early: False when it ran
    to the end, True after an exit signal, --exit-duration-in-mins or --exit-interval, "nan"
    after --max-nan-iterations; each early stop after saving a checkpoint)."""
    train_iterator, valid_iterator = iterators[0], iterators[1]
    for chunk in model:
        chunk.train()
    iteration = args.iteration
    stats = _IntervalStats()
    guard = UpdateGuard(args)
    fp8 = [meta for chunk in model for meta in fp8_metas(chunk)] or None
    print_rank_0(f"[before the start of training step] datetime: {_now()}")
    interval_timer = get_timers()("interval-time", log_level=0)  # paused for eval and saves
    interval_timer.start(barrier=True)
    first = getattr(args, "torch_compile", False)
    while iteration < args.train_iters:
        if update_batch_size(args) and iteration > 0:
            _on_batch_size_change(iteration, model, optimizer, scheduler, args)
        started = time.time()
        step = train_step(forward_step_func, train_iterator, model, optimizer, scheduler,
                          args, guard, stats_log, fp8)
        if first:  # torch.compile works during the first forward and backward
            first = False
            print_rank_0(f" > torch.compile: the first iteration, which compiles the "
                         f"transformer layers, took {time.time() - started:.1f} s")
        losses, grad_norm = step.losses, step.grad_norm
        iteration += 1
        args.iteration = iteration
        args.consumed_train_samples += current_global_batch_size(args)
        progress_log.count_floating_point_operations(args, current_global_batch_size(args))
        stats.add(step)
        if step.spike:
            print_rank_last(f" skipped the update of iteration {iteration}: {guard.last} "
                            "(--skip-spiky-updates)")
        if stats_log is not None:
            lr = optimizer.param_groups[0]["lr"]
            stats_log.write_train(iteration, args.consumed_train_samples, losses, grad_norm, lr,
                                  step.skipped, step.nan, step.spike)
            if step.layers is not None:
                loss = next(iter(losses.values()), None)
                stats_log.write_step(iteration, step.layers,
                                     None if loss is None else float(loss), grad_norm)
        params_norm = optimizer.params_norm() if args.log_params_norm else None
        log_writers.write_training_scalars(
            args, iteration, current_global_batch_size(args), losses,
            optimizer.param_groups[0]["lr"], optimizer.get_loss_scale(), grad_norm, params_norm,
            optimizer.num_zeros_in_grad)
        if iteration % args.log_interval == 0:
            training_log(stats, iteration, grad_norm, optimizer, args, params_norm,
                         optimizer.num_zeros_in_grad)
            stats = _IntervalStats()
        if args.manual_gc and args.manual_gc_interval and \
                iteration % args.manual_gc_interval == 0:
            gc.collect()
        if valid_iterator is not None and args.eval_iters > 0 and \
                iteration % args.eval_interval == 0:
            interval_timer.stop()
            with _gc_around_evaluation(args):
                evaluate_and_print_results(f"iteration {iteration}", forward_step_func,
                                           valid_iterator, model, args, stats_log)
            interval_timer.start(barrier=True)
        if args.async_save:
            _exit_on_checkpoint_error(checkpointing.finalize_async_save)

        def save():
            interval_timer.stop()
            checkpointing.save_checkpoint(iteration, model, optimizer, scheduler, args)
            interval_timer.start(barrier=True)
        if guard.should_stop():
            if args.save:
                save()
            if stats_log is not None:
                stats_log.write_stop(iteration, "nan", _nan_stop_message(iteration, args))
            return iteration, "nan"
        if _checkpoint_and_decide_exit(iteration, save, args, start_time, exit_signal):
            return iteration, True
    return iteration, False


def _nan_stop_message(iteration, args) -> str:
    saved = f"; the last good weights are saved in {args.save} at iteration {iteration}" \
        if args.save else " (no --save: nothing was saved)"
    return (f"stopped at iteration {iteration} after {args.max_nan_iterations} steps with a "
            f"NaN or infinite loss or gradient norm (--max-nan-iterations "
            f"{args.max_nan_iterations}; those updates were not applied){saved}.")


def _checkpoint_and_decide_exit(iteration, save, args, start_time, exit_signal) -> bool:
    """After an iteration: save on --save-interval, and save (once) and say to stop on an exit
    signal, --exit-duration-in-mins or --exit-interval (Megatron-LM's order)."""
    if exit_signal is not None and exit_signal.any_rank_received():
        if args.save:
            save()
        print_rank_0(f"exiting program after receiving {args.exit_signal} at iteration "
                     f"{iteration}")
        return True
    saved = bool(args.save and args.save_interval and iteration % args.save_interval == 0)
    if saved:
        save()
    if args.exit_duration_in_mins is not None:
        minutes = (time.time() - start_time) / 60.0
        if checkpointing.all_ranks_agree(minutes > args.exit_duration_in_mins, "max"):
            if args.save and not saved:
                save()
            print_rank_0(f"exiting program after {minutes:.2f} minutes at iteration "
                         f"{iteration}")
            return True
    if args.exit_interval and iteration % args.exit_interval == 0:
        if args.save and not saved:
            save()
        print_rank_0(f"exiting program at iteration {iteration}")
        return True
    return False


class _IntervalStats:
    """Losses and counters accumulated between two log lines."""

    def __init__(self):
        self.start = time.time()
        self.losses, self.iterations, self.skipped, self.nan = {}, 0, 0, 0

    def add(self, step: "StepResult"):
        self.iterations += 1
        self.skipped += step.skipped
        if step.nan:
            self.nan += 1
            return
        if step.skipped:
            return
        for key, value in step.losses.items():
            self.losses[key] = self.losses.get(key, 0.0) + float(value)


def training_log(stats: _IntervalStats, iteration, grad_norm, optimizer, args,
                 params_norm=None, num_zeros=None) -> None:
    """Megatron-LM's log line, printed by the last rank (where the loss lives), then the
    timers. Collective (every rank calls it): the interval time and timers are gathered."""
    seconds = get_timers()("interval-time").elapsed(barrier=True) / max(stats.iterations, 1)
    elapsed_ms = seconds * 1000.0
    throughput = throughput_tflops_per_device(args, seconds, current_global_batch_size(args))
    lr = optimizer.param_groups[0]["lr"]
    line = f" [{_now()}] iteration {iteration:8d}/{args.train_iters:8d} |"
    line += f" consumed samples: {args.consumed_train_samples:12d} |"
    line += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    if args.log_throughput:
        line += f" throughput per GPU (TFLOP/s/GPU): {throughput:.1f} |"
    line += f" learning rate: {lr:.6E} |"
    line += f" global batch size: {current_global_batch_size(args):5d} |"
    counted = max(stats.iterations - stats.skipped - stats.nan, 1)
    for key, total in stats.losses.items():
        line += f" {key}: {total / counted:.6E} |"
    line += f" loss scale: {optimizer.get_loss_scale():.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    if num_zeros is not None:
        line += f" num zeros: {num_zeros} |"
    if params_norm is not None:
        line += f" params norm: {params_norm:.3f} |"
    line += f" number of skipped iterations: {stats.skipped:3d} |"
    line += f" number of nan iterations: {stats.nan:3d} |"
    print_rank_last(line)
    if not _MEMORY_REPORTED and torch.cuda.is_available() and torch.cuda.is_initialized():
        _MEMORY_REPORTED.append(iteration)
        report_memory(f"(after {iteration} iterations)")
    log_writers.log_interval_timers(args, iteration, seconds, throughput)


_MEMORY_REPORTED = []  # the first log line's iteration, once the memory report is printed


def report_memory(when: str) -> None:
    """Megatron-LM's CUDA memory line, printed once by every data-parallel rank 0:
    ``[Rank 0] (after 10 iterations) memory (MB) | allocated: ... | max allocated: ... |
    reserved: ... | max reserved: ...``."""
    if ps.get_data_parallel_rank() != 0:
        return
    mb = 1024.0 * 1024.0
    line = (f"[Rank {ps.get_global_rank()}] {when} memory (MB)"
            f" | allocated: {torch.cuda.memory_allocated() / mb:.1f}"
            f" | max allocated: {torch.cuda.max_memory_allocated() / mb:.1f}"
            f" | reserved: {torch.cuda.memory_reserved() / mb:.1f}"
            f" | max reserved: {torch.cuda.max_memory_reserved() / mb:.1f}")
    print(line, flush=True)


@torch.no_grad()
def evaluate(forward_step_func, data_iterator, model, args):
    """Mean of each reported loss over --eval-iters global batches (dropout off): over their
    micro-batches, or over their tokens for ``[sum, count]`` pairs (--calculate-per-token-loss;
    summed over the data-parallel group)."""
    for chunk in model:
        chunk.finish_param_sync()  # --overlap-param-gather: the step's gather may be in flight
        chunk.eval()
    totals = {}  # {key: [numerator, denominator]}
    for _ in range(args.eval_iters):
        reported = get_forward_backward_func()(
            forward_step_func=forward_step_func, data_iterator=data_iterator, model=model,
            num_microbatches=args.global_batch_size // (  # the full size, even mid-ramp
                args.micro_batch_size * args.data_parallel_size), forward_only=True,
            calculate_per_token_loss=args.calculate_per_token_loss, **_schedule_kwargs(args))
        for key in (reported[0] if reported else {}):
            values, total = [r[key] for r in reported], totals.setdefault(key, [0.0, 0])
            if values[0].numel() == 2:
                pair = sum_loss_pairs(values)
                total[0], total[1] = total[0] + float(pair[0]), total[1] + float(pair[1])
            else:
                for value in values:
                    total[0] += float(value)
                total[1] += len(values)
        args.consumed_valid_samples += args.global_batch_size
    for chunk in model:
        chunk.train()
    return {key: num / max(den, 1) for key, (num, den) in totals.items()}


def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, args,
                               stats_log=None) -> dict:
    losses = evaluate(forward_step_func, data_iterator, model, args)
    log_writers.write_validation_scalars(args, args.iteration, losses)
    if stats_log is not None:
        stats_log.write_valid(args.iteration, losses)
    line = f" validation loss at {prefix} | "
    for key, value in losses.items():
        line += f"{key} value: {value:.6E} | {key} PPL: {math.exp(min(20.0, value)):.6E} | "
    print_rank_last("-" * (len(line) + 1))
    print_rank_last(line)
    print_rank_last("-" * (len(line) + 1))
    return losses
