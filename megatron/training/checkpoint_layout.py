"""Model weights independent of the parallel layout.

A checkpoint saved at any tensor x pipeline (x virtual, uneven) layout is read here as the
whole tensors of the one-process model, one tensor at a time, and written again at any other
layout. Names are the one-process ``GPTModel.state_dict()`` names ("canonical" names): layers
by their global 0-based index, a tied output layer only as ``embedding.word_embeddings.weight``.

    reader = ModelCheckpoint("ckpt")                # tracker's iteration, any layout
    reader.tensor("decoder.layers.3.mlp.linear_fc1.weight")      # merged over tensor ranks
    save_model_checkpoint("ckpt_tp4", reader.iteration, new_args, reader)   # any layout

Files are memory-mapped and dropped once every tensor they hold has been read, so reading a
checkpoint in canonical order keeps about one pipeline stage of it resident.
"""

import os
import re
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron.core import ConfigError
from megatron.core.extensions.transformer_engine import checkpoint_name, is_extra_state
from megatron.core.tensor_parallel.utils import merge_shards, split_to_shards
from megatron.core.transformer import TransformerConfig
from megatron.training.checkpointing import (
    CHECKPOINT_VERSION,
    TRACKER_FILENAME,
    CheckpointError,
    iteration_dir,
    locate_checkpoint,
    model_file,
    read_checkpoint,
)

VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def partition_of(name: str, gated_linear_unit: bool) -> Tuple[Optional[int], int]:
    """(dimension split across tensor-parallel ranks or None when every rank holds it whole,
    stride) of the parameter ``name`` -- what ``ColumnParallelLinear`` / ``RowParallelLinear`` /
    ``VocabParallelEmbedding`` mark on their parameters (a test keeps the two in step)."""
    if name in VOCAB_TENSORS:
        return 0, 1
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return 0, 1
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return 0, 2 if gated_linear_unit else 1
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1, 1
    return None, 1


def config_from_args(args: dict, **overrides) -> TransformerConfig:
    """The TransformerConfig a run with the stored arguments ``args`` built (``overrides``
    replace entries, e.g. a layout), computing in full precision with the local layers: FP8
    GEMMs and TransformerEngine are how a model was trained, not part of it (conversion and
    generation use the weights as they are; checkpoints hold the local layers' names). The
    context-parallel size is the run's, not the model's: one process holds whole sequences."""
    from megatron.training.arguments import parse_args, transformer_config_from_args
    # a checkpoint written elsewhere (a conversion) may lack some flags: theirs are the defaults
    values = {**vars(parse_args([])), "virtual_pipeline_model_parallel_size": None,
              **args, "fp8_format": None, "fp8_param_gather": False,
              "transformer_impl": "local", "torch_compile": False,
              "recompute_granularity": None, "recompute_activations": False,
              "recompute_method": None, "recompute_num_layers": None,
              "recompute_modules": None, "context_parallel_size": 1, "cp_comm_type": "p2p",
              **overrides}
    if not values["group_query_attention"] and "num_query_groups" not in args:
        values["num_query_groups"] = values["num_attention_heads"]  # as validate_args does
    dtype = values.get("params_dtype", "float32")
    values["params_dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return transformer_config_from_args(SimpleNamespace(**values))


def one_process_args(args: dict) -> dict:
    """``args`` with the tensor and pipeline layout of a single process."""
    return dict(args, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                num_layers_per_virtual_pipeline_stage=None,
                virtual_pipeline_model_parallel_size=None,
                decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
                sequence_parallel=False)


def stages(config: TransformerConfig):
    """(pp_rank, vp_rank, chunk key, layer numbers, pre_process, post_process) of every model
    chunk of the layout in ``config``, in pipeline order."""
    pp, vp = config.pipeline_model_parallel_size, config.virtual_pipeline_model_parallel_size
    out = []
    for p in range(pp):
        for v in range(vp or 1):
            key = f"model{v}" if vp else "model"
            out.append((p, v, key, config.stage_layer_numbers(p, v),
                        p == 0 and v == 0, p == pp - 1 and v == (vp or 1) - 1))
    return out


def canonical_name(local: str, layer_numbers: List[int], tied: bool, pre_process: bool):
    """The one-process name of a stage's parameter ``local``, or None for the last stage's
    copy of a tied embedding."""
    m = _LAYER.match(local)
    if m:
        return f"decoder.layers.{layer_numbers[int(m.group(1))] - 1}.{m.group(2)}"
    if local == "output_layer.weight" and tied and not pre_process:
        return None
    return local


def local_name(canonical: str, layer_numbers: List[int]) -> str:
    m = _LAYER.match(canonical)
    if m:
        return f"decoder.layers.{layer_numbers.index(int(m.group(1)) + 1)}.{m.group(2)}"
    return canonical


def fit_vocab(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocabulary-sized tensor trimmed or zero-padded to ``rows`` rows (padding ids are
    never produced by the tokenizer)."""
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows].clone()  # a view would be saved with its whole storage
    pad = torch.zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad])


class ModelCheckpoint:
    """The weights of the checkpoint in ``load_dir`` (``iteration``, or the tracker's) as
    whole one-process tensors, whatever layout saved them.

    Attributes: ``args`` (the stored arguments, a dict), ``iteration``, ``release``,
    ``config`` (the one-process TransformerConfig), ``names`` (canonical names in the
    one-process model's order). Raises CheckpointError, naming the path, for a missing,
    truncated or inconsistent checkpoint.
    """

    def __init__(self, load_dir: str, iteration: Optional[int] = None):
        self.dir, self.iteration, self.release = locate_checkpoint(load_dir, iteration)
        ranks = self._rank_files()
        first = read_checkpoint(ranks[min(ranks)])
        args = first.get("args")
        if not isinstance(args, dict) or "num_layers" not in args:
            raise CheckpointError(f"{ranks[min(ranks)]} holds no model arguments ('args'); "
                                  "it was not written by this codebase.")
        self.args = dict(args)
        tp, pp = args.get("tensor_model_parallel_size", 1), args.get(
            "pipeline_model_parallel_size", 1)
        self.source_config = config_from_args(args)
        self.config = config_from_args(one_process_args(args))
        expected = {(t, p) for t in range(tp) for p in range(pp)}
        for t, p in sorted(expected - set(ranks)):
            raise CheckpointError(f"{model_file(self.dir, t, p, pp)} is missing: the checkpoint "
                                  f"was saved at tensor-parallel size {tp} and pipeline-parallel "
                                  f"size {pp}.")
        self._files = {key: ranks[key] for key in sorted(expected)}
        self._states = {min(ranks): first}
        self.tensor_model_parallel_size, self.pipeline_model_parallel_size = tp, pp
        self._index: Dict[Tuple[str, str], List[Tuple[Tuple[int, int], tuple]]] = {}
        self._pending: Dict[Tuple[int, int], set] = {key: set() for key in self._files}
        optimizer = first.get("optimizer")
        # per-parameter optimizer state (this codebase's format); an older or foreign layout
        # of it counts as none
        self.has_optimizer_state = isinstance(optimizer, dict) and "param_state" in optimizer
        self.older_optimizer_state = isinstance(optimizer, dict) and not self.has_optimizer_state
        self.optimizer_common = {k: v for k, v in optimizer.items() if k != "param_state"} \
            if self.has_optimizer_state else None
        self.iteration_state = {k: first[k] for k in (
            "iteration", "opt_param_scheduler", "num_floating_point_operations_so_far")
            if k in first}
        self.megatron_lm = bool(first.get("megatron_lm", False))
        self._build_index(tp)
        self.true_vocab_size = args.get("true_vocab_size")
        self.padded_vocab_size = args["padded_vocab_size"]

    def _rank_files(self) -> Dict[Tuple[int, int], str]:
        found = {}
        for name in os.listdir(self.dir):
            m = _RANK_DIR.match(name)
            if m:
                found[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(
                    self.dir, name, "model_optim_rng.pt")
        if not found:
            raise CheckpointError(f"{self.dir} holds no mp_rank_* model files.")
        missing = [path for path in found.values() if not os.path.isfile(path)]
        if missing:
            raise CheckpointError(f"{missing[0]} is missing.")
        return found

    def _state(self, key):
        if key not in self._states:
            self._states[key] = read_checkpoint(self._files[key])
        return self._states[key]

    def _build_index(self, tp: int) -> None:
        """Where each (canonical name, field) lives: field "param" for the weights, and the
        optimizer's per-parameter entries ("exp_avg", "exp_avg_sq", "fp32_param")."""
        tied = self.config.share_embeddings_and_output_weights
        for p, _, chunk, layers, pre, _ in stages(self.source_config):
            for t in range(tp):
                state = self._state((t, p))
                if chunk not in state:
                    raise CheckpointError(f"{self._files[(t, p)]} has no '{chunk}' entry.")
                entries = [("param", local, (chunk, local)) for local in state[chunk]]
                if self.has_optimizer_state:
                    per_param = state.get("optimizer", {}).get("param_state", {}).get(chunk)
                    if per_param is None:
                        raise CheckpointError(f"{self._files[(t, p)]} has no optimizer state "
                                              f"for '{chunk}'; the checkpoint is inconsistent.")
                    entries += [(field, local, ("optimizer", "param_state", chunk, local, field))
                                for local, fields in per_param.items() for field in fields]
                for field, local, path in entries:
                    name = canonical_name(local, layers, tied, pre)
                    if name is not None:
                        self._index.setdefault((name, field), []).append(((t, p), path))
                        self._pending[(t, p)].add((name, field))
        for key in list(self._states):  # reopened when read
            if key[1] > 0:
                del self._states[key]
        for (name, field), shards in self._index.items():
            if len(shards) != tp:
                where = ", ".join(self._files[s[0]] for s in shards[:2])
                raise CheckpointError(f"tensor {name} ({field}) is in {len(shards)} of the {tp} "
                                      f"tensor-parallel files ({where}); the checkpoint is "
                                      "inconsistent.")
        self._all_pending = {key: set(names) for key, names in self._pending.items()}
        self.names = one_process_names(self.args)
        missing = [n for n in self.names if (n, "param") not in self._index]
        if missing:
            raise CheckpointError(f"the checkpoint in {self.dir} lacks {len(missing)} of the "
                                  f"model's tensors (first: {missing[0]}).")
        if self.has_optimizer_state:
            missing = [n for n in self.names if (n, "exp_avg") not in self._index]
            if missing:
                raise CheckpointError(f"the checkpoint in {self.dir} lacks optimizer state for "
                                      f"{len(missing)} tensors (first: {missing[0]}).")

    def fields(self, name: str) -> List[str]:
        """The optimizer entries stored for parameter ``name`` (none without optimizer
        state)."""
        return [f for f in ("exp_avg", "exp_avg_sq", "fp32_param") if (name, f) in self._index]

    def file_state(self, tp_rank: int, pp_rank: int) -> dict:
        """The whole (memory-mapped) state of one file, e.g. for its RNG state."""
        return self._state((tp_rank, pp_rank))

    def rewind(self) -> None:
        """Start another pass over the tensors (files are dropped again as it goes)."""
        self._pending = {key: set(names) for key, names in self._all_pending.items()}

    def partition(self, name: str) -> Tuple[Optional[int], int]:
        return partition_of(name, self.config.gated_linear_unit)

    def _stored(self, key, path) -> torch.Tensor:
        value = self._state(key)
        for part in path:
            value = value[part]
        return value

    def _done(self, keys, entry) -> None:
        for key in keys:
            pending = self._pending[key]
            pending.discard(entry)
            if not pending:  # every tensor of this file read: unmap it
                self._states.pop(key, None)

    def tensor(self, name: str, field: str = "param") -> torch.Tensor:
        """The whole tensor ``name`` (merged over tensor-parallel ranks), a fresh copy; with
        ``field``, that optimizer entry of the parameter."""
        if (name, field) not in self._index:
            raise KeyError(name if field == "param" else f"{name} ({field})")
        where = self._index[(name, field)]
        shards = [self._stored(key, path) for key, path in where]
        dim, stride = self.partition(name)
        full = merge_shards(shards, dim, stride) if dim is not None and len(shards) > 1 \
            else shards[0].clone()
        self._done([key for key, _ in where], (name, field))
        return full

    def tp_shard(self, name: str, field: str, tp_rank: int) -> torch.Tensor:
        """The part of ``name`` that tensor rank ``tp_rank`` of the saved layout held (the
        memory-mapped tensor: copy it to keep it)."""
        key, path = self._index[(name, field)][tp_rank]
        value = self._stored(key, path)
        self._done([key], (name, field))
        return value

    def shape(self, name: str) -> Tuple[int, ...]:
        key, path = self._index[(name, "param")][0]
        shape = list(self._stored(key, path).shape)
        dim, _ = self.partition(name)
        if dim is not None:
            shape[dim] *= len(self._index[(name, "param")])
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        key, path = self._index[(name, "param")][0]
        return self._stored(key, path).dtype


def target_files(args: dict):
    """{(tp_rank, pp_rank): {chunk key: {local name: canonical name}}} of the layout in
    ``args``; the canonical names those files hold come from the one-process model."""
    config = config_from_args(args)
    tp = config.tensor_model_parallel_size
    names = one_process_names(args)
    tied = config.share_embeddings_and_output_weights
    files = {}
    for p, _, chunk, layers, pre, post in stages(config):
        wanted = {}
        for name in names:
            m = _LAYER.match(name)
            if m and int(m.group(1)) + 1 in layers:
                wanted[local_name(name, layers)] = name
            elif name.startswith("embedding.") and pre:
                wanted[name] = name
            elif name.startswith("decoder.final_layernorm") and post:
                wanted[name] = name
            elif name == "output_layer.weight" and post:
                wanted[name] = name
        if post and tied and not pre:  # the last stage's copy of the tied table
            wanted["output_layer.weight"] = "embedding.word_embeddings.weight"
        for t in range(tp):
            files.setdefault((t, p), {})[chunk] = wanted
    return files


def one_process_shapes(args: dict) -> Dict[str, Tuple[int, ...]]:
    """{canonical name: shape} of the one-process model ``args`` describe, in model order
    (built on the meta device: no memory, no initialization)."""
    from megatron.core.models.gpt import GPTModel
    config = config_from_args(one_process_args(args))
    with torch.device("meta"):
        model = GPTModel(config, args["padded_vocab_size"],
                         layer_numbers=range(1, config.num_layers + 1))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def one_process_names(args: dict) -> List[str]:
    """Canonical parameter names of the model ``args`` describe, in model order."""
    return list(one_process_shapes(args))


def retarget_args(args: dict, tensor_model_parallel_size: int = 1,
                  pipeline_model_parallel_size: int = 1,
                  num_layers_per_virtual_pipeline_stage: Optional[int] = None,
                  decoder_first_pipeline_num_layers: Optional[int] = None,
                  decoder_last_pipeline_num_layers: Optional[int] = None) -> dict:
    """``args`` for another parallel layout: sizes, virtual stages and the padded vocabulary
    (a multiple of --make-vocab-size-divisible-by x the tensor-parallel size). Raises
    ConfigError for a layout the model cannot take."""
    from megatron.core.tokenizers import vocab_size_with_padding
    out = dict(args, tensor_model_parallel_size=tensor_model_parallel_size,
               pipeline_model_parallel_size=pipeline_model_parallel_size,
               num_layers_per_virtual_pipeline_stage=num_layers_per_virtual_pipeline_stage,
               decoder_first_pipeline_num_layers=decoder_first_pipeline_num_layers,
               decoder_last_pipeline_num_layers=decoder_last_pipeline_num_layers)
    vp = None
    if num_layers_per_virtual_pipeline_stage:
        if args["num_layers"] % (pipeline_model_parallel_size *
                                 num_layers_per_virtual_pipeline_stage):
            raise ConfigError(
                f"num_layers={args['num_layers']} is not divisible by "
                f"pipeline_model_parallel_size={pipeline_model_parallel_size} x "
                f"num_layers_per_virtual_pipeline_stage={num_layers_per_virtual_pipeline_stage}.")
        vp = args["num_layers"] // (pipeline_model_parallel_size *
                                    num_layers_per_virtual_pipeline_stage)
    out["virtual_pipeline_model_parallel_size"] = vp if vp and vp > 1 else None
    if tensor_model_parallel_size == 1:
        out["sequence_parallel"] = False
    vocab = args.get("true_vocab_size") or args["padded_vocab_size"]
    out["padded_vocab_size"] = vocab_size_with_padding(
        vocab, args.get("make_vocab_size_divisible_by", 128), tensor_model_parallel_size)
    config_from_args(out)  # validates the layout
    return out


def save_model_checkpoint(save_dir: str, iteration: Optional[int], args: dict,
                          tensor: Callable[[str], torch.Tensor],
                          progress: Optional[Callable[[str], None]] = None,
                          training_state=None) -> None:
    """Write a checkpoint of the model whose whole tensors ``tensor(name)`` gives, at the
    layout (and padded vocabulary) in ``args``, under ``save_dir`` in Megatron-LM's layout:
    ``iter_XXXXXXX/`` (or ``release/`` when ``iteration`` is None) and the tracker.

    Weights only, unless ``training_state`` (a reader holding optimizer state, e.g. the
    source ModelCheckpoint) is given: then each parameter's optimizer entries, the optimizer's
    step, the learning-rate schedule and (through ``args``) the data position are written
    too, so training continues from the result as from the source. RNG states are not: they
    belong to the source's layout. One pipeline stage is assembled in memory at a time.
    """
    config = config_from_args(args)
    tp = config.tensor_model_parallel_size
    pp = config.pipeline_model_parallel_size
    tag_dir = os.path.join(save_dir, "release") if iteration is None \
        else iteration_dir(save_dir, iteration)
    files = target_files(args)
    with_optimizer = training_state is not None and training_state.has_optimizer_state

    def shards_of(name, get):
        full = get()
        if name in VOCAB_TENSORS:
            full = fit_vocab(full, args["padded_vocab_size"])
        dim, stride = partition_of(name, config.gated_linear_unit)
        # split_to_shards copies (each shard its own storage, saved alone)
        return split_to_shards(full, tp, dim, stride) if dim is not None and tp > 1 \
            else [full] * tp

    for p in range(pp):
        states = {t: {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                      "iteration": 0 if iteration is None else iteration} for t in range(tp)}
        flops = (training_state.iteration_state if training_state is not None else {}).get(
            "num_floating_point_operations_so_far")
        if flops is not None:  # the --log-progress count continues in the converted run
            for t in range(tp):
                states[t]["num_floating_point_operations_so_far"] = flops
        if with_optimizer:
            for t in range(tp):
                states[t]["optimizer"] = {"param_state": {}, **training_state.optimizer_common}
                if "opt_param_scheduler" in training_state.iteration_state:
                    states[t]["opt_param_scheduler"] = \
                        training_state.iteration_state["opt_param_scheduler"]
        for chunk in files[(0, p)]:
            for t in range(tp):
                states[t][chunk] = {}
                if with_optimizer:
                    states[t]["optimizer"]["param_state"][chunk] = {}
            for local, name in files[(0, p)][chunk].items():
                for t, shard in enumerate(shards_of(name, lambda: tensor(name))):
                    states[t][chunk][local] = shard
                if with_optimizer:
                    for field in training_state.fields(name):
                        shards = shards_of(name, lambda: training_state.tensor(name, field))
                        for t, shard in enumerate(shards):
                            states[t]["optimizer"]["param_state"][chunk].setdefault(
                                local, {})[field] = shard
                if progress is not None:
                    progress(name)
        for t in range(tp):
            path = model_file(tag_dir, t, p, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(states[t], path)
        del states
    with open(os.path.join(save_dir, TRACKER_FILENAME), "w") as f:
        f.write("release" if iteration is None else str(iteration))


def open_model_checkpoint(load_dir: str, iteration: Optional[int] = None):
    """The reader for the checkpoint in ``load_dir``: ours or Megatron-LM's ``torch`` files
    (ModelCheckpoint), or megatron-core's ``torch_dist`` folders."""
    from megatron.training import torch_dist_checkpoint
    iter_dir, _, _ = locate_checkpoint(load_dir, iteration)
    if torch_dist_checkpoint.is_torch_dist(iter_dir):
        return torch_dist_checkpoint.TorchDistCheckpoint(load_dir, iteration)
    return ModelCheckpoint(load_dir, iteration)


def parameter_names(model_chunks) -> Dict[torch.nn.Parameter, str]:
    """{parameter: canonical name} of this rank's model chunks (the last stage's copy of a
    tied embedding is named as the embedding)."""
    names = {}
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        layers = [layer.layer_number for layer in module.decoder.layers]
        tied = module.share_embeddings_and_output_weights
        for local, param in module.named_parameters():
            names[param] = canonical_name(checkpoint_name(local), layers, tied,
                                          module.pre_process) or \
                "embedding.word_embeddings.weight"
    return names


def shard_for(source, name: str, field: str, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``name`` (``field``: "param" or an optimizer
    entry), shaped like ``param`` of the live model at any tensor-parallel size. ``source``
    is a reader (ModelCheckpoint, ...) or a function of the name giving whole weights."""
    from megatron.core import parallel_state as ps
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    split = getattr(param, "tensor_model_parallel", False) and tp > 1
    if getattr(source, "tensor_model_parallel_size", None) == tp and hasattr(source, "tp_shard"):
        # saved at this tensor-parallel size: the file of this rank holds the very shard
        stored = source.tp_shard(name, field, rank if split or tp > 1 else 0)
        if tuple(stored.shape) == tuple(param.shape):
            return stored
    full = source.tensor(name, field) if hasattr(source, "tensor") else source(name)
    if name in VOCAB_TENSORS:
        rows = param.shape[0] * (tp if split else 1)
        full = fit_vocab(full, rows)
    if split:
        full = split_to_shards(full, tp, param.partition_dim,
                               getattr(param, "partition_stride", 1))[rank]
    if tuple(full.shape) != tuple(param.shape):
        raise CheckpointError(f"tensor {name} has shape {tuple(full.shape)} in the "
                              f"checkpoint but {tuple(param.shape)} in this model.")
    return full


def load_model_weights(model_chunks, source) -> None:
    """Fill this rank's model chunks (any tensor-parallel size, any pipeline stage) from
    ``source``: a checkpoint reader, or a function giving whole one-process tensors by name.
    Each parameter takes its slice along the dimension its layer splits (no communication)."""
    names = parameter_names(model_chunks)
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        state = {local: shard_for(source, names[param], "param", param)
                 for local, param in module.named_parameters()}
        # TransformerEngine's FP8 metadata is no weight (checkpointing restores it apart)
        result = module.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not is_extra_state(k)]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"the model's entries {missing or result.unexpected_keys} "
                                  "could not be loaded.")
