"""Checkpoints in Megatron-LM's layout, written atomically, loadable with weights_only=True.

    <save>/latest_checkpointed_iteration.txt          the last complete iteration (written last)
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt  one file per tensor rank
    <save>/iter_0000100/mp_rank_00_001/...             ... and pipeline rank when PP > 1

A checkpoint is assembled under ``iter_XXXXXXX.tmp`` and renamed into place when every rank
has written its file, then the tracker file is replaced; a run killed part-way leaves the
previous checkpoint and tracker untouched.
"""

import os
import pickle
import re
import shutil
import zipfile

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_rng_state, set_rng_state
from megatron.core.tokenizers import TOKENIZER_ARGS
from megatron.training.utils import barrier, print_rank_0

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0

# Arguments that define the model's parameters and numerics: a checkpoint whose values differ
# cannot be loaded into this run.
MODEL_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "norm_placement", "mix_ln_alpha", "embedding_norm", "normalization",
    "norm_epsilon", "position_embedding_type", "rotary_base", "rotary_percent", "swiglu",
    "add_bias_linear", "untie_embeddings_and_output_weights", "max_position_embeddings",
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


def model_state(model_chunks) -> dict:
    return {key: chunk.state_dict() for key, chunk in zip(_model_keys(model_chunks), model_chunks)}


def save_checkpoint(iteration: int, model, optimizer, scheduler, args) -> None:
    """Write this rank's part of checkpoint ``iteration`` under ``args.save``.

    Data-parallel rank 0 of each (tensor, pipeline) position writes; all ranks of the default
    group take part in the barriers.
    """
    root = args.save
    final_dir, tmp_dir = iteration_dir(root, iteration), iteration_dir(root, iteration) + ".tmp"
    if ps.get_global_rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    barrier()
    optimizer_state = optimizer.state_dict()  # collective with the distributed optimizer
    if ps.get_data_parallel_rank() == 0:
        state = {
            "args": _plain_args(args),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            **model_state(model),
            "optimizer": optimizer_state,
            "opt_param_scheduler": scheduler.state_dict(),
            "rng_state": [get_rng_state()],
        }
        path = _this_rank_file(tmp_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path + ".part")
        os.replace(path + ".part", path)
    barrier()
    if ps.get_global_rank() == 0:
        _move_into_place(tmp_dir, final_dir)
        tracker = os.path.join(root, TRACKER_FILENAME)
        with open(tracker + ".tmp", "w") as f:
            f.write(str(iteration))
        os.replace(tracker + ".tmp", tracker)
    barrier()
    print_rank_0(f"  successfully saved checkpoint from iteration {iteration:7d} to {root}")


def _move_into_place(tmp_dir: str, final_dir: str) -> None:
    old = final_dir + ".old"
    if os.path.exists(final_dir):  # saving the same iteration again: swap, then delete
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final_dir, old)
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
    if not os.path.isdir(path):
        raise CheckpointError(f"the tracker file {tracker} names iteration {text}, but {path} "
                              "does not exist.")
    return path, iteration, release


def find_checkpoint(load_dir: str):
    """The checkpoint file this rank would load, or None (with Megatron's warning) when the
    directory holds no tracker file. Raises CheckpointError for a tracker or file that is
    there but unusable."""
    tracker = os.path.join(load_dir, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        print_rank_0(f"WARNING: could not find the metadata file {tracker}; will not load any "
                     "checkpoints and will start from random")
        return None
    iter_dir, iteration, _ = locate_checkpoint(load_dir)
    path = _this_rank_file(iter_dir)
    if not os.path.isfile(path):
        raise CheckpointError(f"the tracker file {tracker} names iteration {iteration}, but "
                              f"{path} does not exist.")
    return path


def read_checkpoint(path: str) -> dict:
    """Memory-map a checkpoint file (cheap: tensors are read when used)."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a complete PyTorch "
                              "checkpoint (truncated or corrupt).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"cannot read checkpoint {path}: it holds pickled Python objects "
                              "that weights_only loading refuses (not written by this "
                              "codebase).") from None
    except Exception as e:  # a damaged archive
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") \
            from None


def is_release(path: str) -> bool:
    """A checkpoint file under ``release/`` (a converted model): weights only, used as with
    --finetune."""
    return os.path.basename(os.path.dirname(os.path.dirname(path))) == "release"


def check_checkpoint(path: str, state: dict, args) -> None:
    """Refuse a checkpoint that lacks what this run would load from it, or whose
    model-defining arguments differ from this run's."""
    needed = {key: None for key in _model_keys(
        [None] * (args.virtual_pipeline_model_parallel_size or 1))}
    needed["iteration"] = None
    if not args.finetune and not is_release(path):
        if not args.no_load_optim:
            needed.update(optimizer="--no-load-optim", opt_param_scheduler="--no-load-optim")
        if not args.no_load_rng:
            needed["rng_state"] = "--no-load-rng"
    for key, flag in needed.items():
        if key not in state:
            hint = f"; pass {flag} to load it without" if flag else ""
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry{hint}.")
    if "optimizer" in needed:
        saved_distributed = bool(state["optimizer"].get("distributed", False))
        if saved_distributed != bool(args.use_distributed_optimizer):
            kind = "with" if saved_distributed else "without"
            raise CheckpointError(f"checkpoint {path} was saved {kind} "
                                  "--use-distributed-optimizer and this run differs; use the "
                                  "same setting, or pass --no-load-optim.")
    saved_args = state.get("args", {})
    diffs = []
    for key in MODEL_ARGS:
        if key == "mix_ln_alpha" and args.norm_placement != "mix":
            continue
        if key in saved_args and saved_args[key] != getattr(args, key, None):
            diffs.append(f"--{key.replace('_', '-')} is {saved_args[key]} there but "
                         f"{getattr(args, key, None)} here")
    if diffs:
        raise CheckpointError(f"checkpoint {path} was saved with other model arguments: "
                              + "; ".join(diffs) + ".")


# What --use-checkpoint-args takes from the checkpoint: the model and its tokenizer.
CHECKPOINT_ARGS = tuple(k for k in MODEL_ARGS if k not in (
    "padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers")) + ("group_query_attention",)


def load_args_from_checkpoint(args) -> None:
    """--use-checkpoint-args: set the model's flags (and the tokenizer's, when none is given)
    from the checkpoint in --load. Raises CheckpointError naming the path."""
    if not args.load:
        raise CheckpointError("--use-checkpoint-args needs --load.")
    iter_dir, _, _ = locate_checkpoint(args.load)
    ranks = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_"))
    if not ranks:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_* model files.")
    saved = read_checkpoint(os.path.join(iter_dir, ranks[0], "model_optim_rng.pt")).get("args")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{iter_dir} records no arguments for --use-checkpoint-args.")
    for key in CHECKPOINT_ARGS:
        if key in saved:
            setattr(args, key, saved[key])
    if args.seq_length is None and saved.get("seq_length"):
        args.seq_length = saved["seq_length"]
    if args.tokenizer_type is None:
        for key in TOKENIZER_ARGS:
            if saved.get(key) is not None:
                setattr(args, key, saved[key])


def _copy_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _copy_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_tensors(v) for v in obj)
    return obj


def _check_model_keys(path: str, saved: dict, expected: dict) -> None:
    """Refuse weights whose names or shapes differ from the model's, naming a few."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected),
                        ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{what}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model; "
                              + "; ".join(problems) + ".")


def load_checkpoint(state: dict, path: str, model, optimizer, scheduler, args) -> int:
    """Restore the model (and unless told otherwise the optimizer, scheduler, RNG and data
    position) from ``state``; return the iteration to continue from."""
    for key, chunk in zip(_model_keys(model), model):
        _check_model_keys(path, state[key], chunk.state_dict())
        chunk.load_state_dict(state[key], strict=True)
    if args.finetune or is_release(path):
        optimizer.reload_model_params()
        why = "finetune" if args.finetune else "release checkpoint"
        print_rank_0(f" loaded weights from {path} ({why}: iteration 0, fresh optimizer)")
        return 0
    if args.no_load_optim:
        optimizer.reload_model_params()
    else:
        # torch keeps same-dtype state tensors as given: copy them off the memory-mapped file
        optimizer.load_state_dict(_copy_tensors(state["optimizer"]))
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if not args.no_load_rng:
        set_rng_state(state["rng_state"][0])
    saved_args = state.get("args", {})
    args.consumed_train_samples = int(saved_args.get("consumed_train_samples", 0))
    args.consumed_valid_samples = int(saved_args.get("consumed_valid_samples", 0))
    iteration = int(state["iteration"])
    print_rank_0(f"  successfully loaded checkpoint from {path} at iteration {iteration}")
    if dist.is_available() and dist.is_initialized():
        barrier()
    return iteration
