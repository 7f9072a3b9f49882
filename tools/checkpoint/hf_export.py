"""Our checkpoint -> a Hugging Face model directory.

Native classes where they hold the model exactly (see hf_native.py), else our own modeling
file shipped beside the weights (``trust_remote_code=True``). Weights stream tensor by tensor
into safetensors (sharded past ``max_shard_bytes``); the padded vocabulary is trimmed to the
tokenizer's size.
"""

import json
import os
import shutil
from typing import Callable, List, Optional

import hf_native
import hf_remote
import torch
from hf_tokenizer import check_hf_tokenizer, save_hf_tokenizer
from safetensors_io import PlannedTensor, save_sharded

from megatron.training.checkpoint_layout import VOCAB_TENSORS

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _native_outputs(mapping, name: str, get: Callable[[str], torch.Tensor], vocab: int,
                    args: dict):
    """[(hf name, tensor)] for our tensor ``name`` (tensors may live on the meta device)."""
    if name == "embedding.embedding_norm.weight":
        return []  # folded into the table below
    if name == "embedding.word_embeddings.weight":
        table = get(name)[:vocab]
        out = []
        if args.get("embedding_norm"):
            out.append(("model.embed_tokens.weight", hf_native.fold_embedding_norm(
                table, get("embedding.embedding_norm.weight"), args["norm_epsilon"])))
            if not args.get("untie_embeddings_and_output_weights"):
                out.append(("lm_head.weight", table))  # the tied output layer, unnormalized
        else:
            out.append(("model.embed_tokens.weight", table))
        return out
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", get(name))]
    if name == "output_layer.weight":
        return [("lm_head.weight", get(name)[:vocab])]
    if name.startswith(hf_native.LAYER_PREFIX):
        index, suffix = name[len(hf_native.LAYER_PREFIX):].split(".", 1)
        return [(f"model.layers.{index}.{hf}", t)
                for hf, t in mapping.export_layer(suffix, get(name))]
    raise KeyError(f"{mapping.hf_class} has no place for {name}")


def _remote_outputs(name: str, get, vocab: int):
    t = get(name)
    return [(hf_remote.remote_name(name), t[:vocab] if name in VOCAB_TENSORS else t)]


def plan_tensors(names: List[str], shape, dtype: torch.dtype, tensor, args: dict,
                 vocab: int, arch: Optional[str]) -> List[PlannedTensor]:
    """Every tensor of the export, in model order, each made on demand from ``tensor``.
    Shapes come from running the same mapping on meta tensors of ``shape(name)``."""
    mapping = hf_native.MAPPINGS[arch](args) if arch else None
    if args.get("apply_layernorm_1p"):  # exported gains are 1 + ours, for every class
        stored = tensor
        tensor = lambda n: hf_native.fold_one_plus(n, stored(n))  # noqa: E731

    def outputs(name, get):
        if mapping is None:
            return _remote_outputs(name, get, vocab)
        return _native_outputs(mapping, name, get, vocab, args)

    meta = lambda n: torch.empty(shape(n), dtype=dtype, device="meta")  # noqa: E731
    cache = {}  # the outputs of the last tensor read (q, k and v come from one fused tensor)

    def make(name, hf_name):
        if cache.get("name") != name:
            cache.clear()
            cache.update(name=name, out=dict(outputs(name, tensor)))
        return cache["out"][hf_name].to(dtype)

    planned = []
    for name in names:
        for hf_name, t in outputs(name, meta):
            planned.append(PlannedTensor(hf_name, tuple(t.shape), dtype,
                                         lambda n=name, h=hf_name: make(n, h)))
    return planned


def export_dtype(args: dict) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(args.get("params_dtype", "float32")), torch.float32)


def write_hf_model(reader, tokenizer, save_dir: str, max_shard_bytes: int,
                   progress: Callable[[str], None] = None) -> dict:
    """Write the model ``reader`` holds (a ModelCheckpoint) and ``tokenizer`` (ours) into the
    existing, empty ``save_dir``. Returns {"architecture", "reason", "files", "vocab_size",
    "remote"}."""
    args = reader.args
    arch, reason = hf_native.native_architecture(args)
    special = save_hf_tokenizer(tokenizer, save_dir)
    vocab = special.pop("vocab_size")
    has_tokenizer_files = special.pop("files", True)
    if vocab > reader.padded_vocab_size:
        raise ValueError(f"the tokenizer has {vocab} tokens but the model only "
                         f"{reader.padded_vocab_size} embedding rows; is it the tokenizer the "
                         "model was trained with?")
    dtype = export_dtype(args)
    plan = plan_tensors(reader.names, reader.shape, dtype, reader.tensor, args, vocab, arch)
    files = save_sharded(plan, save_dir, max_shard_bytes, progress)
    if arch:
        config = _native_config(hf_native.MAPPINGS[arch](args), vocab, special, dtype)
    else:
        config = hf_remote.remote_config(args, vocab, special)
        shutil.copy(hf_remote.modeling_file_path(),
                    os.path.join(save_dir, hf_remote.REMOTE_MODULE + ".py"))
    with open(os.path.join(save_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    generation = {k: v for k, v in special.items() if v is not None}
    with open(os.path.join(save_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2, sort_keys=True)
    if has_tokenizer_files:  # the model's config.json can change what AutoTokenizer picks
        check_hf_tokenizer(tokenizer, save_dir)
    return {"architecture": config["architectures"][0], "reason": reason, "files": files,
            "vocab_size": vocab, "remote": arch is None, "tokenizer_files": has_tokenizer_files}


def _native_config(mapping, vocab: int, special: dict, dtype: torch.dtype) -> dict:
    """config.json through the installed transformers' own config class (so its current
    keys are used), plus the pre-5.0 rope keys for older readers."""
    import transformers
    kwargs = mapping.hf_config(vocab, special, DTYPE_NAMES[dtype])
    cls = getattr(transformers, mapping.hf_class.replace("ForCausalLM", "Config"))
    config = cls(**{k: v for k, v in kwargs.items() if k != "model_type"}).to_dict()
    config["rope_theta"] = kwargs["rope_theta"]
    if "partial_rotary_factor" in kwargs:
        config["partial_rotary_factor"] = kwargs["partial_rotary_factor"]
    config["torch_dtype"] = kwargs["dtype"]
    return config
