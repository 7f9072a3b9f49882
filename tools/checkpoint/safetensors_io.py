"""Write safetensors files one tensor at a time, sharded past a size limit, with the index
file Hugging Face reads; read them back lazily.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets), then the raw bytes. Knowing every shape and dtype up front, the header is
written first and each tensor is produced, written and dropped in turn, so memory holds one
tensor at a time whatever the model's size.
"""

import json
import os
import struct
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
          torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class PlannedTensor(NamedTuple):
    """A tensor to write: its name, shape and dtype, and how to make it when its turn comes."""
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40,
             "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "B": 1}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ValueError(f"cannot read the size {text!r}; write e.g. 5GB, 500MB or 2GiB")


def nbytes(t: PlannedTensor) -> int:
    n = 1
    for s in t.shape:
        n *= s
    return n * torch.empty((), dtype=t.dtype).element_size()


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int
                ) -> List[List[PlannedTensor]]:
    """Tensors grouped in order into shards of at most ``max_shard_bytes`` (a single larger
    tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + nbytes(t) > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes(t)
    if current or not shards:
        shards.append(current)
    return shards


def _write_file(path: str, tensors: Sequence[PlannedTensor],
                progress: Callable[[str], None] = None) -> None:
    header, offset = {}, 0
    for t in tensors:
        size = nbytes(t)
        header[t.name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            value = t.make()
            if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
                raise RuntimeError(f"{t.name}: made {tuple(value.shape)} {value.dtype}, planned "
                                   f"{tuple(t.shape)} {t.dtype}")
            f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del value
            if progress is not None:
                progress(t.name)
        f.flush()
        os.fsync(f.fileno())


def save_sharded(tensors: Sequence[PlannedTensor], save_dir: str, max_shard_bytes: int,
                 progress: Callable[[str], None] = None) -> List[str]:
    """Write ``tensors`` as ``model.safetensors``, or as numbered shards and
    ``model.safetensors.index.json`` when they exceed ``max_shard_bytes``. Returns the
    file names."""
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _write_file(os.path.join(save_dir, WEIGHTS_NAME), shards[0], progress)
        return [WEIGHTS_NAME]
    names, weight_map = [], {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(os.path.join(save_dir, name), shard, progress)
        names.append(name)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors)},
             "weight_map": weight_map}
    with open(os.path.join(save_dir, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
    return names + [INDEX_NAME]


class SafetensorsDirectory:
    """The tensors of a Hugging Face model directory (``model.safetensors`` or shards with an
    index), read one at a time with plain file reads (no memory map: pages already read do not
    stay in this process's resident memory). Raises ValueError naming the file for a missing,
    truncated or damaged shard."""

    def __init__(self, model_dir: str):
        self.dir = model_dir
        single, index = os.path.join(model_dir, WEIGHTS_NAME), os.path.join(model_dir,
                                                                           INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map: Dict[str, str] = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{index} is not a safetensors index ({e}).") from None
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise ValueError(f"{model_dir} holds no {WEIGHTS_NAME} or {INDEX_NAME}.")
        files = sorted(set(weight_map.values())) if weight_map else [WEIGHTS_NAME]
        self._entries = {}  # name -> (path, dtype, shape, start, end)
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing (named in {INDEX_NAME}).")
            for key, entry in _read_header(path).items():
                self._entries[key] = (path,) + entry
        if weight_map:
            for key, name in weight_map.items():
                path = os.path.join(model_dir, name)
                if self._entries.get(key, (None,))[0] != path:
                    raise ValueError(f"{path} does not hold {key}, which {INDEX_NAME} places "
                                     "there.")

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entries[name][2]

    def get(self, name: str) -> torch.Tensor:
        path, dtype, shape, start, end = self._entries[name]
        buffer = bytearray(end - start)
        with open(path, "rb") as f:
            f.seek(start)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"{path} is truncated (while reading {name}).")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


_DTYPE_OF = {code: dtype for dtype, code in DTYPES.items()}


def _read_header(path: str) -> Dict[str, tuple]:
    """{name: (dtype, shape, absolute start, end)} of one file; refuses a truncated or damaged
    one (its size must reach the end of the last tensor)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is truncated (no safetensors header).")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ValueError(f"{path} is truncated (a header of {length} bytes in a file of "
                             f"{size}).")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise ValueError(f"{path} has a damaged safetensors header.") from None
    entries, end = {}, 0
    for key, value in header.items():
        if key == "__metadata__":
            continue
        if value.get("dtype") not in _DTYPE_OF:
            raise ValueError(f"{path}: tensor {key} has the unsupported dtype "
                             f"{value.get('dtype')}.")
        first, last = value["data_offsets"]
        entries[key] = (_DTYPE_OF[value["dtype"]], tuple(value["shape"]), 8 + length + first,
                        8 + length + last)
        end = max(end, last)
    if 8 + length + end > size:
        raise ValueError(f"{path} is truncated: {size} bytes, but its tensors need "
                         f"{8 + length + end}.")
    return entries
