"""Megatron-LM's ``--ckpt-format torch_dist`` checkpoints, read without megatron-core.

    <load>/latest_checkpointed_iteration.txt
    <load>/iter_0000100/metadata.json     {"sharded_backend": "torch_dist", ...}, written last
                        common.pt         args (an argparse.Namespace), iteration, scheduler
                        .metadata         torch.distributed.checkpoint's index: every tensor's
                                          global shape and dtype, its chunks, where each lies
                        __0_0.distcp ...  the chunks, each a torch.save'd tensor

Tensors are stored whole (un-sharded) under megatron-core's ``sharded_state_dict`` keys, the
layers stacked on a leading axis (``decoder.layers.self_attention.linear_qkv.weight`` is
[num_layers, ...]) and the norms under TransformerEngine's fused names; the layout that saved
them only decides how they were cut into chunks. ``TorchDistCheckpoint`` offers them as
``ModelCheckpoint`` does: one layer's tensor at a time under our one-process names, read from
the chunks that hold that layer.

Nothing here runs pickled code: ``.metadata`` (a pickle, which torch itself loads with
``pickle.load``) is read by an unpickler that builds only torch.distributed.checkpoint's
metadata classes; chunks and ``common.pt`` are read with ``torch.load(weights_only=True)``.
Only the model's weights are read; optimizer state (Megatron-LM's layout) and RNG states are
not.
"""

import io
import json
import os
import pickle
import re
from typing import Dict, Optional, Tuple

import torch

from megatron.training.checkpoint_layout import (
    config_from_args,
    one_process_args,
    one_process_shapes,
    partition_of,
)
from megatron.training.checkpointing import CheckpointError, locate_checkpoint

CONFIG_FILENAME = "metadata.json"  # megatron-core's, written once every rank has saved
COMMON_FILENAME = "common.pt"
INDEX_FILENAME = ".metadata"  # torch.distributed.checkpoint's
_STACKED = re.compile(r"^decoder\.layers\.([a-z_].*)$")  # not decoder.layers.<index>.


def convert_hint(load_dir: str) -> str:
    """How Megatron-LM turns the checkpoint in ``load_dir`` into its ``torch`` format, which
    ModelCheckpoint reads."""
    return (f"convert it with Megatron-LM: run pretrain_gpt.py with the run's flags and --load "
            f"{load_dir} --ckpt-convert-format torch --ckpt-convert-save <out>, then load "
            "<out>/torch")


def is_torch_dist(iter_dir: str) -> bool:
    """Whether ``iter_dir`` holds a megatron-core distributed checkpoint: its metadata.json,
    or (a save that did not finish) common.pt without mp_rank_* folders. Other backends and
    unfinished saves are then refused by TorchDistCheckpoint with the reason."""
    if os.path.isfile(os.path.join(iter_dir, CONFIG_FILENAME)):
        return True
    return os.path.isfile(os.path.join(iter_dir, COMMON_FILENAME)) and not any(
        name.startswith("mp_rank_") for name in os.listdir(iter_dir))


# ---------------------------------------------------------------------------------------------
# .metadata: a pickle of torch.distributed.checkpoint.metadata.Metadata

class _Inert:
    """Stand-in for megatron-core's empty placeholder classes (MCoreMetadata, MCoreSavePlan in
    checkpoints of megatron-core <= 0.15): holds the pickled fields, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass


_INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.planner": (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),
    "torch": ("Size",),
    "collections": ("OrderedDict",),
}
_INERT = ("megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata",
          "megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan")


class _Refused(pickle.UnpicklingError):
    """A global the index may not name (its qualified name)."""


class _IndexUnpickler(pickle.Unpickler):
    """Builds torch.distributed.checkpoint's metadata dataclasses, torch dtypes and sizes;
    refuses every other global (where ``pickle.load`` would import and call anything)."""

    def find_class(self, module, name):
        import importlib
        if f"{module}.{name}" in _INERT:
            return _Inert
        found = None
        if name in _INDEX_CLASSES.get(module, ()):
            found = getattr(importlib.import_module(module), name, None)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def read_index(path: str):
    """torch.distributed.checkpoint's Metadata in ``path`` (a ``.metadata`` file), built
    without running pickled code. Raises CheckpointError naming the path."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the torch_dist checkpoint has no index of its "
                              "tensors (damaged or partly copied).")
    try:
        with open(path, "rb") as f:
            index = _IndexUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(f"cannot read {path}: it needs the pickled Python object {e}, "
                              "which is never run here (only torch.distributed.checkpoint's "
                              "metadata classes are read).") from None
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {first} (truncated or "
                              "corrupt).") from None
    if not isinstance(getattr(index, "state_dict_metadata", None), dict) or \
            not isinstance(getattr(index, "storage_data", None), dict):
        raise CheckpointError(f"{path} is not a torch.distributed.checkpoint index.")
    return index


# ---------------------------------------------------------------------------------------------
# The reader

class TorchDistCheckpoint:
    """The weights of the ``torch_dist`` checkpoint in ``load_dir`` (``iteration``, or the
    tracker's) as whole one-process tensors, with ModelCheckpoint's interface.

    Attributes: ``dir``, ``iteration``, ``release``, ``args`` (Megatron-LM's arguments as our
    flags), ``config`` (one process) and ``source_config`` (the saved layout), ``names``,
    ``true_vocab_size``, ``padded_vocab_size``; no optimizer state (``has_optimizer_state``
    False: load with --finetune or --no-load-optim). Raises CheckpointError, naming the path,
    for a missing, truncated, unsafe or inconsistent checkpoint or a model this codebase
    cannot hold. Touches no process group.
    """

    def __init__(self, load_dir: str, iteration: Optional[int] = None):
        from megatron.training.megatron_lm_checkpoint import read_file
        self.dir, self.iteration, self.release = locate_checkpoint(load_dir, iteration)
        self._load_dir = load_dir
        self._check_backend()
        common_path = os.path.join(self.dir, COMMON_FILENAME)
        if not os.path.isfile(common_path):
            raise CheckpointError(f"{common_path} is missing: the torch_dist checkpoint has no "
                                  "arguments or iteration.")
        common = read_file(common_path)  # Megatron-LM's args translated to ours
        if not isinstance(common.get("args"), dict):
            raise CheckpointError(f"{common_path} holds no Megatron-LM arguments ('args' as an "
                                  "argparse.Namespace).")
        self.args = dict(common["args"])
        self.source_config = config_from_args(self.args)
        self.config = config_from_args(one_process_args(self.args))
        self.true_vocab_size = self.args.get("true_vocab_size")
        self.padded_vocab_size = self.args["padded_vocab_size"]
        self.iteration_state = {k: common[k] for k in ("iteration", "opt_param_scheduler")
                                if k in common}
        self._common = common
        self.megatron_lm, self.has_optimizer_state, self.optimizer_common = True, False, None
        index_path = os.path.join(self.dir, INDEX_FILENAME)
        index = read_index(index_path)
        self._storage = {(i.fqn, tuple(i.offset or ())): s for i, s in index.storage_data.items()}
        self._check_files()
        self._index: Dict[str, Tuple[str, Optional[int]]] = {}  # name -> (key, layer or None)
        self._meta = {}
        shapes = one_process_shapes(self.args)
        for key, meta in index.state_dict_metadata.items():
            if hasattr(meta, "chunks") and not key.startswith("optimizer."):
                self._add(key, meta, shapes, index_path)
        self.names = list(shapes)
        missing = [n for n in self.names if n not in self._index]
        if missing:
            raise CheckpointError(f"the torch_dist checkpoint in {self.dir} lacks "
                                  f"{len(missing)} of the model's tensors (first: "
                                  f"{missing[0]}).")

    def _check_backend(self) -> None:
        path = os.path.join(self.dir, CONFIG_FILENAME)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the torch_dist save did not finish (it "
                                  "is written last); load an earlier iteration.")
        try:
            with open(path) as f:
                backend = json.load(f).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"cannot read {path}: {e}.") from None
        if backend != "torch_dist":
            raise CheckpointError(f"{self.dir} is a megatron-core checkpoint in the "
                                  f"{backend!r} format, which is not read here; "
                                  f"{convert_hint(self._load_dir)}.")

    def _check_files(self) -> None:
        """Every file the index points into is there and long enough."""
        ends = {}
        for info in self._storage.values():
            end = info.offset + info.length
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
        for name, end in sorted(ends.items()):
            path = os.path.join(self.dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} is missing: the torch_dist checkpoint in "
                                      f"{self.dir} is incomplete ({INDEX_FILENAME} lists "
                                      f"{len(ends)} data files).")
            if os.path.getsize(path) < end:
                raise CheckpointError(f"{path} is truncated ({os.path.getsize(path)} bytes, "
                                      f"{INDEX_FILENAME} needs {end}).")

    def _add(self, key: str, meta, shapes: dict, index_path: str) -> None:
        """Index the tensor ``key`` under our names (one per layer when stacked)."""
        from megatron.training.megatron_lm_checkpoint import our_name
        size = tuple(meta.size)
        covered = sum(_numel(c.sizes) for c in meta.chunks)
        if covered != _numel(size):
            raise CheckpointError(f"{index_path} is inconsistent: the chunks of {key} hold "
                                  f"{covered} of its {_numel(size)} elements.")
        m = _STACKED.match(key)
        if m:
            layers = self.config.num_layers
            if not size or size[0] != layers:
                raise CheckpointError(f"{key} in {self.dir} stacks {size[0] if size else 0} "
                                      f"layers, but the arguments say {layers}.")
            targets = [(our_name(f"decoder.layers.{i}.{m.group(1)}"), i) for i in range(layers)]
            size = size[1:]
        else:
            targets = [(our_name(key), None)]
        for name, layer in targets:
            if name not in shapes:
                raise CheckpointError(f"the torch_dist checkpoint in {self.dir} holds {key}, "
                                      "which this codebase's model has no place for.")
            if tuple(shapes[name]) != size:
                raise CheckpointError(f"{key} in {self.dir} has shape {size} per layer, but "
                                      f"the model its arguments describe has {name} of shape "
                                      f"{tuple(shapes[name])}.")
            self._index[name] = (key, layer)
        self._meta[key] = meta

    def tensor(self, name: str, field: str = "param") -> torch.Tensor:
        """The whole tensor ``name`` (one layer of a stacked key), read from its chunks."""
        if name not in self._index or field != "param":
            raise KeyError(name if field == "param" else f"{name} ({field})")
        key, layer = self._index[name]
        meta = self._meta[key]
        out = torch.empty(self.shape(name), dtype=meta.properties.dtype)
        for chunk in meta.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if layer is not None:
                if not offsets[0] <= layer < offsets[0] + sizes[0]:
                    continue
                data = self._read_chunk(key, offsets, sizes, meta)[layer - offsets[0]]
                offsets = offsets[1:]
            else:
                data = self._read_chunk(key, offsets, sizes, meta)
            out[tuple(slice(o, o + s) for o, s in zip(offsets, data.shape))] = data
        return out

    def _read_chunk(self, key, offsets, sizes, meta) -> torch.Tensor:
        info = self._storage.get((key, offsets))
        if info is None:
            raise CheckpointError(f"{os.path.join(self.dir, INDEX_FILENAME)} lists a chunk of "
                                  f"{key} at {list(offsets)} but not where it is stored.")
        path = os.path.join(self.dir, info.relative_path)
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path} stores {key} with the transforms "
                                  f"{list(info.transform_descriptors)}, which are not read "
                                  f"here; {convert_hint(self._load_dir)}.")
        with open(path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        try:
            data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged chunk
            raise CheckpointError(f"cannot read {key} from {path}: {type(e).__name__} "
                                  "(the file is damaged).") from None
        if not isinstance(data, torch.Tensor) or tuple(data.shape) != sizes or \
                data.dtype != meta.properties.dtype:
            raise CheckpointError(f"{path} holds something else than the {sizes} "
                                  f"{meta.properties.dtype} chunk of {key} its index names.")
        return data

    def shape(self, name: str) -> Tuple[int, ...]:
        key, layer = self._index[name]
        size = tuple(self._meta[key].size)
        return size if layer is None else size[1:]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[self._index[name][0]].properties.dtype

    def partition(self, name: str) -> Tuple[Optional[int], int]:
        return partition_of(name, self.config.gated_linear_unit)

    def fields(self, name: str) -> list:
        """No optimizer entries: Megatron-LM's optimizer state is not read."""
        return []

    def file_state(self, tp_rank: int, pp_rank: int) -> dict:
        """The state shared by every rank (common.pt, translated): no RNG state, which
        Megatron-LM keeps per rank in the chunks."""
        return self._common

    def rewind(self) -> None:
        """Start another pass (nothing is cached: each tensor is read from its chunks)."""


def _numel(sizes) -> int:
    n = 1
    for s in sizes:
        n *= int(s)
    return n
