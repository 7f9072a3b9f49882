"""Checkpoints in Megatron-LM's layout, written atomically, loadable with weights_only=True.

    <save>/latest_checkpointed_iteration.txt          the last complete iteration (written last)
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt  one file per tensor rank
    <save>/iter_0000100/mp_rank_00_001/...             ... and pipeline rank when PP > 1

A checkpoint is assembled under ``iter_XXXXXXX.tmp`` and renamed into place when every rank
has written its file, then the tracker file is replaced; a run killed part-way leaves the
previous checkpoint and tracker untouched.
"""

import os
import re
import shutil
import threading
import time

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.extensions.transformer_engine import checkpoint_name, is_extra_state
from megatron.core.tensor_parallel import get_rng_state, set_rng_state
from megatron.core.tokenizers import TOKENIZER_ARGS
from megatron.training.progress_log import log_checkpoint_saved
from megatron.training.utils import barrier, print_rank_0

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0

# Arguments that define the model's parameters and numerics: a checkpoint whose values differ
# cannot be loaded into this run.
MODEL_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "norm_placement", "mix_ln_alpha", "embedding_norm", "normalization",
    "norm_epsilon", "qk_layernorm", "apply_layernorm_1p", "position_embedding_type",
    "rotary_base", "rotary_percent", "swiglu", "add_bias_linear",
    "untie_embeddings_and_output_weights", "max_position_embeddings",
    "padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers",
)


class CheckpointError(Exception):
    """A checkpoint that is there but cannot be used; the message names the path."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def model_file(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(iter_dir, name, "model_optim_rng.pt")


def _this_rank_file(iter_dir: str) -> str:
    return model_file(iter_dir, ps.get_tensor_model_parallel_rank(),
                      ps.get_pipeline_model_parallel_rank(),
                      ps.get_pipeline_model_parallel_world_size())


def _plain_args(args) -> dict:
    """The flags as numbers, strings, booleans and lists (what weights_only can load)."""
    plain = {}
    for key, value in vars(args).items():
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        if value is None or isinstance(value, (bool, int, float, str)) or (
                isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value)):
            plain[key] = value
    return plain


def _model_keys(model_chunks) -> list:
    """'model', or 'model0', 'model1', ... for virtual pipeline chunks (Megatron's names)."""
    return ["model"] if len(model_chunks) == 1 else [f"model{k}" for k in range(len(model_chunks))]


def model_state(model_chunks):
    """({chunk key: weights under the local implementation's names}, {chunk key:
    TransformerEngine's FP8 metadata entries, ``_extra_state``}; the latter empty without
    TE)."""
    weights, extra = {}, {}
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        state = chunk.state_dict()
        weights[key] = {checkpoint_name(name): value for name, value in state.items()
                        if not is_extra_state(name)}
        te = {name: value for name, value in state.items()
              if is_extra_state(name) and isinstance(value, torch.Tensor)}
        if te:
            extra[key] = te
    return weights, extra


def _has_te_extra_state(model_chunks) -> bool:
    return any(is_extra_state(name) for chunk in model_chunks for name in chunk.state_dict())


def _state_to_save(iteration: int, model, optimizer, scheduler, args):
    """This rank's checkpoint file contents, or None on data-parallel ranks > 0 (which write
    nothing). Collective over the data-parallel group with the distributed optimizer.

    The optimizer's state is stored per parameter under the parameter's name, so a run at
    another layout can take its slice of it."""
    save_optim = not getattr(args, "no_save_optim", False)
    per_param = optimizer.param_state() if save_optim else None
    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return None  # a replica (context-parallel ranks hold the same weights too)
    weights, te_extra = model_state(model)
    state = {
        "args": _plain_args(args),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far":
            float(getattr(args, "num_floating_point_operations_so_far", 0.0)),
        **weights,
    }
    if save_optim:  # Megatron-LM's --no-save-optim drops the optimizer and its schedule
        param_state = {}
        for key, chunk in zip(_model_keys(model), model):
            module = getattr(chunk, "module", chunk)
            param_state[key] = {checkpoint_name(name): per_param[param]
                                for name, param in module.named_parameters()}
        state["optimizer"] = {"param_state": param_state, **optimizer.common_state(),
                              "distributed": bool(args.use_distributed_optimizer)}
        state["opt_param_scheduler"] = scheduler.state_dict()
    if not getattr(args, "no_save_rng", False):
        state["rng_state"] = [get_rng_state()]
    fp8 = _fp8_state(model)
    if fp8:
        state["fp8_state"] = fp8
    if te_extra:
        state["te_extra_state"] = te_extra
    return state


def _fp8_state(model) -> dict:
    """{chunk key: {module name: {role: {"scale", "history"}}}} of the FP8 linear layers
    (delayed scaling's state; the same on every tensor- and data-parallel rank)."""
    out = {}
    for key, chunk in zip(_model_keys(model), model):
        module = getattr(chunk, "module", chunk)
        layers = {name: {role: {"scale": st.scale.clone(), "history": st.history.clone()}
                         for role, st in m.fp8_meta.states.items()}
                  for name, m in module.named_modules()
                  if getattr(m, "fp8_meta", None) is not None}
        if layers:
            out[key] = layers
    return out


def _load_fp8_state(model, saved: dict) -> bool:
    """Restore the FP8 scaling state saved by ``_fp8_state``; False if it does not fit."""
    restored = []
    for key, chunk in zip(_model_keys(model), model):
        module = getattr(chunk, "module", chunk)
        for name, m in module.named_modules():
            if getattr(m, "fp8_meta", None) is None:
                continue
            entry = saved.get(key, {}).get(name)
            if entry is None:
                return False
            for role, st in m.fp8_meta.states.items():
                history = entry[role]["history"]
                if history.shape != st.history.shape:
                    return False  # another --fp8-amax-history-len
                restored.append((st, entry[role]["scale"], history))
    for st, scale, history in restored:
        st.scale = scale.to(st.scale.device, torch.float32).clone()
        st.history = history.to(st.history.device, torch.float32).clone()
    return True


def _load_te_extra_state(model, saved: dict) -> bool:
    """Restore TransformerEngine's FP8 metadata saved by ``model_state``; False (nothing
    restored) if it does not fit this model."""
    pairs = []
    for key, chunk in zip(_model_keys(model), model):
        module = getattr(chunk, "module", chunk)
        wanted = [name for name in module.state_dict() if is_extra_state(name)]
        entries = saved.get(key, {})
        if any(name not in entries for name in wanted):
            return False
        pairs.append((module, {name: entries[name] for name in wanted}))
    for module, extra in pairs:
        module.load_state_dict(extra, strict=False)
    return True


def _fsync(path: str) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    _fsync(path)
    _fsync(os.path.dirname(path))


def _copy_to_cpu(obj):
    """A snapshot of ``obj`` whose tensors are CPU copies (what an asynchronous save writes
    while training changes the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copy_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_to_cpu(v) for v in obj)
    return obj


class _AsyncSave:
    """A checkpoint whose files a background thread is writing; finalized (moved into place,
    tracker updated) once every rank's writer is done."""

    def __init__(self, iteration, root, tmp_dir, path, state, keep_last, retain=None,
                 log_progress=False):
        self.iteration, self.root, self.tmp_dir, self.keep_last = iteration, root, tmp_dir, \
            keep_last
        self.retain, self.log_progress = retain, log_progress
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(path, state), daemon=True,
                                       name=f"checkpoint-writer-{iteration}")
        self.thread.start()

    def _run(self, path, state):
        try:
            if state is not None:
                _write_file(path, state)
        except BaseException as e:  # noqa: BLE001 - reported at finalization
            self.error = f"{type(e).__name__}: {e}"


_PENDING = None  # the asynchronous save in progress, if any
last_copy_seconds = 0.0  # how long the last asynchronous save copied state (benchmarks)


def all_ranks_agree(flag: bool, op: str = "max") -> bool:
    """``flag`` reduced over every rank: "max" (any rank) or "min" (all ranks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return bool(t.item())


def finalize_async_save(blocking: bool = False) -> None:
    """Complete the pending asynchronous save if every rank's files are written (or, with
    ``blocking``, once they are). Every rank calls this at the same points of the loop."""
    global _PENDING
    if _PENDING is None:
        return
    pending = _PENDING
    if blocking:
        pending.thread.join()
    if not all_ranks_agree(not pending.thread.is_alive(), "min"):
        return
    _PENDING = None
    if all_ranks_agree(pending.error is not None, "max"):
        raise CheckpointError(f"the asynchronous save of iteration {pending.iteration} to "
                              f"{pending.root} failed"
                              + (f" on this rank: {pending.error}" if pending.error else
                                 " on another rank") + "; the previous checkpoint is kept.")
    if ps.get_global_rank() == 0:
        _publish(pending.root, pending.tmp_dir, pending.iteration, pending.keep_last,
                 pending.retain)
    print_rank_0(f"  successfully saved checkpoint from iteration {pending.iteration:7d} to "
                 f"{pending.root} (asynchronously)")
    if pending.log_progress:
        from megatron.training.progress_log import append_to_progress_log
        append_to_progress_log(pending.root, f"Saved async checkpoint\tIteration: "
                               f"{pending.iteration}", sync=False)


def save_checkpoint(iteration: int, model, optimizer, scheduler, args) -> None:
    """Write checkpoint ``iteration`` under ``args.save``: every file under
    ``iter_XXXXXXX.tmp``, flushed, the folder renamed into place, the tracker file replaced
    last. With ``args.async_save`` the state is copied to CPU memory and written by a
    background thread; the checkpoint is finalized later (``finalize_async_save``).

    Data-parallel rank 0 of each (tensor, pipeline) position writes; all ranks of the default
    group take part in the barriers.
    """
    finalize_async_save(blocking=True)  # a second save waits for the first
    for chunk in model:  # --overlap-param-gather: parameters still being all-gathered
        if hasattr(chunk, "finish_param_sync"):
            chunk.finish_param_sync()
    root = args.save
    tmp_dir = iteration_dir(root, iteration) + ".tmp"
    if ps.get_global_rank() == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of saves that were killed
            if re.fullmatch(r"iter_\d{7}\.tmp", name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp_dir)
    barrier()
    state = _state_to_save(iteration, model, optimizer, scheduler, args)
    path = _this_rank_file(tmp_dir)
    keep_last = getattr(args, "ckpt_keep_last", None)
    retain = getattr(args, "save_retain_interval", None)
    if getattr(args, "async_save", False):
        global _PENDING, last_copy_seconds
        start = time.perf_counter()
        snapshot = _copy_to_cpu(state)
        last_copy_seconds = time.perf_counter() - start
        _PENDING = _AsyncSave(iteration, root, tmp_dir, path, snapshot, keep_last, retain,
                              getattr(args, "log_progress", False))
        print_rank_0(f"  scheduled asynchronous save of iteration {iteration:7d} to {root} "
                     f"(state copied to CPU memory in {last_copy_seconds:.2f} s)")
        log_checkpoint_saved(args, iteration)
        return
    if state is not None:
        _write_file(path, state)
    barrier()
    if ps.get_global_rank() == 0:
        _publish(root, tmp_dir, iteration, keep_last, retain)
    barrier()
    print_rank_0(f"  successfully saved checkpoint from iteration {iteration:7d} to {root}")
    log_checkpoint_saved(args, iteration)


def _publish(root: str, tmp_dir: str, iteration: int, keep_last, retain=None) -> None:
    """Rename the complete ``tmp_dir`` into place, then point the tracker at it; then drop
    checkpoints beyond the newest ``keep_last``, and (Megatron-LM's --save-retain-interval)
    the previous one unless its iteration is a multiple of ``retain``."""
    _fsync(tmp_dir)
    _move_into_place(tmp_dir, iteration_dir(root, iteration))
    _fsync(root)
    tracker = os.path.join(root, TRACKER_FILENAME)
    previous = None
    if retain and os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        previous = int(text) if text.isdigit() else None
    with open(tracker + ".tmp", "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker + ".tmp", tracker)
    _fsync(root)
    if previous and previous != iteration and previous % retain and \
            not os.path.islink(iteration_dir(root, previous)):
        shutil.rmtree(iteration_dir(root, previous), ignore_errors=True)
    if keep_last:
        done = sorted(int(n[5:]) for n in os.listdir(root) if re.fullmatch(r"iter_\d{7}", n))
        for old in done[:-keep_last]:
            if old != iteration:
                shutil.rmtree(iteration_dir(root, old), ignore_errors=True)


def _move_into_place(tmp_dir: str, final_dir: str) -> None:
    old = final_dir + ".old"
    if os.path.exists(final_dir):  # saving the same iteration again: swap, then delete
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final_dir, old)  # killed here: locate_checkpoint reads the .old folder
    os.rename(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


def locate_checkpoint(load_dir: str, iteration: int = None):
    """(iteration directory, iteration, release) of the checkpoint to read: ``iteration`` when
    given, else the one the tracker file names. Raises CheckpointError naming the path."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint directory {load_dir} does not exist.")
    if iteration is not None:
        path = iteration_dir(load_dir, iteration)
        if not os.path.isdir(path):
            found = sorted(int(n[5:]) for n in os.listdir(load_dir)
                           if re.fullmatch(r"iter_\d{7}", n))
            raise CheckpointError(f"{path} does not exist (iterations in {load_dir}: "
                                  f"{', '.join(map(str, found)) or 'none'}).")
        return path, iteration, False
    tracker = os.path.join(load_dir, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"{load_dir} holds no checkpoint: {TRACKER_FILENAME} is missing "
                              "(pass --iteration N to pick one by number).")
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        path, iteration, release = os.path.join(load_dir, "release"), 0, True
    elif text.isdigit():
        path, iteration, release = iteration_dir(load_dir, int(text)), int(text), False
    else:
        raise CheckpointError(f"the tracker file {tracker} holds {text!r}, not an iteration "
                              "number or 'release'.")
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path += ".old"  # a save of the same iteration was killed between its two renames
    if not os.path.isdir(path):
        raise CheckpointError(f"the tracker file {tracker} names iteration {text}, but {path} "
                              "does not exist.")
    return path, iteration, release


def starts_from_pretrained(args) -> bool:
    """Megatron-LM's fine-tuning start: --pretrained-checkpoint is given and --load holds
    nothing yet (a resumed fine-tuning run loads its own checkpoint from --load instead)."""
    if not getattr(args, "pretrained_checkpoint", None):
        return False
    return not args.load or (args.ckpt_step is None and
                             not os.path.isfile(os.path.join(args.load, TRACKER_FILENAME)))


def open_checkpoint(args):
    """The checkpoint this run resumes from (``--load``, ``--ckpt-step``) as a layout-free
    reader, checked against the run; None (with Megatron's warning) when --load holds no
    tracker file and no step is asked for. Raises CheckpointError naming the path."""
    from megatron.training.checkpoint_layout import open_model_checkpoint
    if starts_from_pretrained(args):
        reader = open_model_checkpoint(args.pretrained_checkpoint, None)
        reader.pretrained = True
        check_checkpoint(reader, args)
        return reader
    tracker = os.path.join(args.load, TRACKER_FILENAME)
    if args.ckpt_step is None and not os.path.isfile(tracker):
        if getattr(args, "exit_on_missing_checkpoint", False):
            raise CheckpointError(f"--exit-on-missing-checkpoint: could not find the metadata "
                                  f"file {tracker}, so --load holds no checkpoint.")
        print_rank_0(f"WARNING: could not find the metadata file {tracker}; will not load any "
                     "checkpoints and will start from random")
        return None
    reader = open_model_checkpoint(args.load, args.ckpt_step)
    check_checkpoint(reader, args)
    return reader


def read_checkpoint(path: str) -> dict:
    """One checkpoint file as a state in this codebase's format (a Megatron-LM file is
    translated), memory-mapped; raises CheckpointError naming the path."""
    from megatron.training.megatron_lm_checkpoint import read_file
    return read_file(path)


LAYOUT_ARGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
               "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
               "decoder_last_pipeline_num_layers", "padded_vocab_size",
               "num_virtual_stages_per_pipeline_rank")


def same_layout(saved_args: dict, args) -> bool:
    """Whether the run splits the model as the checkpoint's run did (same files, same
    shards): then each rank's RNG streams carry over."""
    return all(saved_args.get(k) == getattr(args, k, None) for k in LAYOUT_ARGS)


def check_checkpoint(reader, args) -> None:
    """Refuse a checkpoint that lacks what this run would load from it, or whose model
    differs from this run's (the parallel layout may differ)."""
    weights_only = args.finetune or reader.release or getattr(reader, "pretrained", False)
    if not weights_only and not args.no_load_optim and not reader.has_optimizer_state:
        why = "it was written by Megatron-LM, whose optimizer layout differs" \
            if reader.megatron_lm else "its optimizer state is in the layout of an older " \
            "version of this codebase" if getattr(reader, "older_optimizer_state", False) \
            else "it was saved with --no-save-optim" \
            if reader.args.get("no_save_optim") else "it holds weights only"
        raise CheckpointError(f"checkpoint {reader.dir} has no optimizer state this run can "
                              f"load ({why}); pass --finetune (weights only, from iteration 0) "
                              "or --no-load-optim (keep its iteration and data position).")
    if not weights_only and "iteration" not in reader.iteration_state:
        raise CheckpointError(f"checkpoint {reader.dir} records no iteration; pass --finetune.")
    saved_args = reader.args
    diffs = []
    for key in MODEL_ARGS:
        if key in LAYOUT_ARGS or (key == "mix_ln_alpha" and args.norm_placement != "mix"):
            continue
        if key in saved_args and saved_args[key] != getattr(args, key, None):
            diffs.append(f"--{key.replace('_', '-')} is {saved_args[key]} there but "
                         f"{getattr(args, key, None)} here")
    saved_vocab = saved_args.get("true_vocab_size")
    if saved_vocab is not None and saved_vocab != getattr(args, "true_vocab_size", saved_vocab):
        diffs.append(f"the tokenizer's vocabulary has {saved_vocab} entries there but "
                     f"{args.true_vocab_size} here")
    if diffs:
        raise CheckpointError(f"checkpoint {reader.dir} was saved with other model arguments: "
                              + "; ".join(diffs) + ".")


# What --use-checkpoint-args takes from the checkpoint: the model and its tokenizer.
CHECKPOINT_ARGS = tuple(k for k in MODEL_ARGS if k not in (
    "padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers")) + ("group_query_attention",)


def load_args_from_checkpoint(args) -> None:
    """--use-checkpoint-args: set the model's flags (and the tokenizer's, when none is given)
    from the checkpoint in --load. Raises CheckpointError naming the path."""
    source = args.pretrained_checkpoint if starts_from_pretrained(args) else args.load
    if not source:
        raise CheckpointError("--use-checkpoint-args needs --load or --pretrained-checkpoint.")
    from megatron.training.checkpoint_layout import open_model_checkpoint
    saved = open_model_checkpoint(source, args.ckpt_step if source == args.load
                                  else None).args
    for key in CHECKPOINT_ARGS:
        if key in saved:
            setattr(args, key, saved[key])
    if args.seq_length is None and saved.get("seq_length"):
        args.seq_length = saved["seq_length"]
    if args.tokenizer_type is None:
        for key in TOKENIZER_ARGS:
            if saved.get(key) is not None:
                setattr(args, key, saved[key])


def load_checkpoint(reader, model, optimizer, scheduler, args) -> int:
    """Restore this rank's model chunks (and unless told otherwise the optimizer, scheduler,
    RNG and data position) from ``reader``, whatever layout saved it; return the iteration
    to continue from."""
    from megatron.training.checkpoint_layout import load_model_weights
    load_model_weights(model, reader)
    where = reader.dir
    if args.finetune or reader.release or getattr(reader, "pretrained", False):
        optimizer.reload_model_params()
        why = "--pretrained-checkpoint" if getattr(reader, "pretrained", False) else \
            "finetune" if args.finetune else "release checkpoint"
        print_rank_0(f" loaded weights from {where} ({why}: iteration 0, fresh optimizer)")
        return 0
    if args.no_load_optim:
        optimizer.reload_model_params()
    else:
        optimizer.load_param_state(_param_state_reader(model, reader), reader.optimizer_common)
        scheduler.load_state_dict(reader.iteration_state["opt_param_scheduler"])
    saved_args = reader.args
    if not args.no_load_rng:
        rng = None
        if same_layout(saved_args, args):
            rng = reader.file_state(ps.get_tensor_model_parallel_rank(),
                                    ps.get_pipeline_model_parallel_rank()).get("rng_state")
        if rng:
            set_rng_state(rng[0])
        else:
            print_rank_0(f" note: {where} was saved at another parallel layout (or without "
                         "RNG state); random generators start from --seed")
    if any(getattr(m, "fp8_meta", None) is not None for chunk in model for m in chunk.modules()):
        _restore_at_same_layout(reader, model, args, "fp8_state", _load_fp8_state,
                                "FP8 scaling state", "the FP8 scales")
    if _has_te_extra_state(model):
        _restore_at_same_layout(reader, model, args, "te_extra_state", _load_te_extra_state,
                                "TransformerEngine FP8 metadata",
                                "TransformerEngine's FP8 scales")
    args.consumed_train_samples = int(saved_args.get("consumed_train_samples", 0))
    args.num_floating_point_operations_so_far = float(
        reader.iteration_state.get("num_floating_point_operations_so_far", 0.0))
    args.consumed_valid_samples = int(saved_args.get("consumed_valid_samples", 0))
    iteration = int(reader.iteration_state["iteration"])
    print_rank_0(f"  successfully loaded checkpoint from {where} at iteration {iteration}")
    if dist.is_available() and dist.is_initialized():
        barrier()
    return iteration


def _restore_at_same_layout(reader, model, args, key, load, what, which) -> None:
    """Restore this rank's ``key`` entry with ``load(model, saved)`` when the checkpoint was
    saved at this layout; otherwise (or when it does not fit) a note that ``which`` start
    afresh."""
    saved = reader.file_state(ps.get_tensor_model_parallel_rank(),
                              ps.get_pipeline_model_parallel_rank()).get(key) \
        if same_layout(reader.args, args) else None
    if not (saved and load(model, saved)):
        print_rank_0(f" note: {reader.dir} holds no {what} for this model and layout; "
                     f"{which} start afresh")


def _param_state_reader(model, reader):
    """parameter -> its whole (this rank's shard of) optimizer entries from ``reader``."""
    from megatron.training.checkpoint_layout import parameter_names, shard_for
    names = parameter_names(model)

    def saved_for(param):
        name = names[param]
        return {field: shard_for(reader, name, field, param) for field in reader.fields(name)}
    return saved_for
