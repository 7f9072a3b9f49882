"""Reading one checkpoint file safely: ours, or one written by Megatron-LM / megatron-core.

``read_file(path)`` returns the file's state in this codebase's format (``args`` a dict of our
flag names, model entries under our parameter names). Files are loaded with
``torch.load(weights_only=True)``: pickled code is never run. Besides tensors, numbers,
strings and containers, only the plain types Megatron-LM stores are read: its arguments
(``argparse.Namespace``), NumPy's RNG state, and megatron-core enums (as their member names;
those classes are not importable here, our package owns ``megatron.core``).

A Megatron-LM `torch`-format file (``args`` a Namespace) is translated:

    args                 Megatron-LM's arguments -> our flags; features we cannot hold refused
    model, model0, ...   megatron-core names -> ours (TransformerEngine's fused-norm names
                         renamed, ``_extra_state`` dropped)
    opt_param_scheduler  kept (ours resumes its step count)
    num_floating_point_operations_so_far  kept (--log-progress continues the count)
    rng_state            converted to ours when every generator state converts, else dropped
    optimizer            dropped: Megatron-LM's layout differs (load with --finetune or
                         --no-load-optim)

and marked ``megatron_lm: True``.
"""

import argparse
import functools
import io
import pathlib
import pickle
import re
import signal
import types
import zipfile
from typing import Optional

import torch

from megatron.core.extensions.transformer_engine import FUSED_NORM_NAMES


def read_file(path: str) -> dict:
    """The state in ``path`` (memory-mapped: tensors are read when used), a Megatron-LM file
    translated. Raises CheckpointError naming the path for a truncated, corrupt or unsafe file
    or a model this codebase cannot hold."""
    from megatron.training.checkpointing import CheckpointError
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a complete PyTorch "
                              "checkpoint (truncated or corrupt).")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(path) or _first_line(e)
        raise CheckpointError(f"cannot read checkpoint {path}: it needs the pickled Python "
                              f"object {refused}, which is never run here (only tensors, "
                              "numbers, strings, containers and Megatron-LM's argument types "
                              "are read).") from None
    except Exception as e:  # a damaged archive
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{_first_line(e)}") from None
    if isinstance(state, dict) and isinstance(state.get("args"), argparse.Namespace):
        return translate(state, path)
    return state


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _refused_global(path: str) -> str:
    """The first global in ``path`` that weights_only loading refuses (found by scanning the
    pickle, not by running it), or ''."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - the caller reports the load error instead
        return ""
    return names[0] if names else ""


# ---------------------------------------------------------------------------------------------
# What weights_only loading may build besides tensors and containers.

# megatron-core enums Megatron-LM stores (in args, or its rerun state): {value: member name};
# None for str-valued enums, whose value is the flag's own spelling.
_MODEL_TYPE = {1: "encoder_or_decoder", 2: "encoder_and_decoder", 3: "retro_encoder",
               4: "retro_decoder"}
_ENUMS = {
    "megatron.core.transformer.enums.AttnBackend": {1: "flash", 2: "fused", 3: "unfused",
                                                    4: "local", 5: "auto"},
    "megatron.core.transformer.enums.CudaGraphScope": {
        1: "full_iteration", 2: "attn", 3: "mlp", 4: "moe", 5: "moe_router",
        6: "moe_preprocess", 7: "mamba"},
    "megatron.core.enums.ModelType": _MODEL_TYPE,
    "megatron.core.transformer.enums.ModelType": _MODEL_TYPE,
    "megatron.core.rerun_state_machine.RerunState": {
        0: "NOT_RUNNING_YET", 1: "INITIAL_RUN", 2: "RERUNNING_IN_PLACE",
        3: "WILL_RERUN_FROM_CHECKPOINT", 4: "RERUNNING_FROM_CHECKPOINT",
        5: "RERUNNING_AGAIN_FROM_CHECKPOINT"},
    "megatron.core.rerun_state_machine.RerunMode": None,
    "megatron.core.rerun_state_machine.RerunDiagnostic": None,
    "megatron.core.enums.Fp8Recipe": None,
    "megatron.core.enums.Fp4Recipe": None,
}


class _Record:
    """Stand-in for a pickled megatron-core dataclass (OptimizerConfig): its fields as
    attributes, none of its code."""


def _enum_member(qualname: str, members: Optional[dict]):
    short = qualname.rsplit(".", 1)[-1]

    def member(value):
        if members is None:
            return str(value)
        return members.get(value, f"{short}({value!r})")
    return member


def _signal_name(value) -> str:
    try:
        return signal.Signals(value).name
    except ValueError:
        return f"signal {value}"


def _path(*parts) -> str:
    return str(pathlib.PurePosixPath(*parts))


@functools.lru_cache(maxsize=1)
def _safe_globals() -> list:
    """Plain types, and stand-ins under the qualified names of classes that are not (or must
    not be) imported here."""
    import numpy as np
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") \
        else np.core.multiarray._reconstruct
    found = [argparse.Namespace, types.SimpleNamespace, io.BytesIO, bytes, np.ndarray, np.dtype,
             (reconstruct, "numpy.core.multiarray._reconstruct"),   # NumPy 1 files
             (reconstruct, "numpy._core.multiarray._reconstruct"),  # NumPy 2 files
             (_signal_name, "signal.Signals"),
             (_path, "pathlib.PosixPath"), (_path, "pathlib._local.PosixPath"),
             (_Record, "megatron.core.optimizer.optimizer_config.OptimizerConfig")]
    if hasattr(np, "dtypes"):  # NumPy >= 1.25 pickles dtypes by their class (numbers only)
        found += [getattr(np.dtypes, n) for n in dir(np.dtypes)
                  if n.endswith("DType") and n not in ("ObjectDType", "StringDType")]
    found += [(_enum_member(name, members), name) for name, members in _ENUMS.items()]
    return found


# ---------------------------------------------------------------------------------------------
# Translation of a Megatron-LM file.

# TransformerEngine-spec names (norms fused into the next linear layer; TE's operation-based
# MLP, --use-te-op-fuser, as megatron-core maps it) -> ours.
_TE_NAMES = {
    **FUSED_NORM_NAMES,
    "mlp.0.weight": "pre_mlp_layernorm.weight",
    "mlp.0.bias": "pre_mlp_layernorm.bias",
    "mlp.1.basic_ops.0.weight": "mlp.linear_fc1.weight",
    "mlp.1.basic_ops.1.bias": "mlp.linear_fc1.bias",
    "mlp.3.basic_ops.0.weight": "mlp.linear_fc2.weight",
    "mlp.3.basic_ops.1.bias": "mlp.linear_fc2.bias",
}
_LAYER = re.compile(r"^(decoder\.layers\.\d+)\.(.+)$")


def our_name(key: str) -> Optional[str]:
    """Our name of the megatron-core parameter ``key`` (local or TransformerEngine spec), or
    None for an entry that holds no weights (``_extra_state``)."""
    if key.endswith("._extra_state"):
        return None
    m = _LAYER.match(key)
    if m and m.group(2) in _TE_NAMES:
        return f"{m.group(1)}.{_TE_NAMES[m.group(2)]}"
    return key


def translate(state: dict, path: str) -> dict:
    """A Megatron-LM file's state in this codebase's format (see the module docstring)."""
    from megatron.training.checkpointing import CheckpointError
    version = state.get("checkpoint_version", 0)
    if not isinstance(version, (int, float)) or version < 3:
        raise CheckpointError(f"checkpoint {path} has checkpoint_version {version}, an older "
                              "Megatron-LM layout of the attention weights; only version 3.0 "
                              "files are read.")
    out = {"args": args_from_namespace(state["args"], path), "checkpoint_version": version,
           "megatron_lm": True}
    if state.get("iteration") is not None:
        out["iteration"] = int(state["iteration"])
    if state.get("num_floating_point_operations_so_far") is not None:
        out["num_floating_point_operations_so_far"] = \
            float(state["num_floating_point_operations_so_far"])
    for key, value in state.items():
        if re.fullmatch(r"model\d*", key) and isinstance(value, dict):
            out[key] = _model_state(value, path)
    scheduler = _scheduler_state(state.get("opt_param_scheduler", state.get("lr_scheduler")))
    if scheduler is not None:
        out["opt_param_scheduler"] = scheduler
    rng = _rng_states(state.get("rng_state"))
    if rng is not None:
        out["rng_state"] = rng
    return out


def _model_state(model: dict, path: str) -> dict:
    from megatron.training.checkpointing import CheckpointError
    out = {}
    for key, value in model.items():
        if key.startswith("language_model."):
            raise CheckpointError(f"checkpoint {path} holds a legacy Megatron-LM model ({key}), "
                                  "which this codebase cannot hold; convert it to megatron-core "
                                  "names first.")
        name = our_name(key)
        if name is not None:
            out[name] = value
    return out


_SCHEDULER_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                   "num_steps")


def _scheduler_state(saved) -> Optional[dict]:
    """Megatron-LM's OptimizerParamScheduler state as ours (both count steps in samples)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("num_steps"), (int, float)):
        return None
    return {key: saved[key] for key in _SCHEDULER_KEYS if key in saved}


def _rng_states(saved) -> Optional[list]:
    """Megatron-LM's per-rank RNG states (a list, one per data-parallel rank with
    --data-parallel-random-init) in our format, or None when one does not convert."""
    if not isinstance(saved, list) or not saved:
        return None
    try:
        return [_rng_state(s) for s in saved]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _generator_state(state, what: str) -> torch.Tensor:
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        raise ValueError(what)
    return state


def _rng_state(s: dict) -> dict:
    import numpy as np
    version, internal, gauss = s["random_rng_state"]
    name, keys, pos, has_gauss, cached_gaussian = s["np_rng_state"]
    keys = np.asarray(keys)
    if keys.dtype != np.uint32:
        raise ValueError("np_rng_state")
    tracker = {k: _generator_state(v, k) for k, v in s["rng_tracker_states"].items()}
    # The tracker's states are the accelerator's generator states (CUDA: 16 bytes) or, on a
    # CPU, the CPU generator's; a GPU run's states cannot seed a CPU run's dropout.
    size = 16 if torch.cuda.is_available() else torch.get_rng_state().numel()
    if "model-parallel-rng" not in tracker or any(t.numel() != size for t in tracker.values()):
        raise ValueError("rng_tracker_states")
    cuda = s.get("cuda_rng_state")
    return {
        "random_rng_state": [int(x) for x in internal],
        "random_rng_version": int(version),
        "random_rng_gauss": None if gauss is None else float(gauss),
        "np_rng_state": [str(name), torch.from_numpy(keys.copy()), int(pos), int(has_gauss),
                         float(cached_gaussian)],
        "torch_rng_state": _generator_state(s["torch_rng_state"], "torch_rng_state"),
        "cuda_rng_state": None if cuda is None else _generator_state(cuda, "cuda_rng_state"),
        "rng_tracker_states": tracker,
    }


# ---------------------------------------------------------------------------------------------
# Megatron-LM's arguments.

# Megatron-LM arguments (set when truthy) that change the model in ways this codebase cannot
# hold: field -> what the message calls it (default: its flag).
_UNSUPPORTED = {
    "qk_l2_norm": "", "num_experts": "--num-experts (mixture of experts)",
    "multi_latent_attention": "",
    "mtp_num_layers": "--mtp-num-layers (multi-token prediction)",
    "rotary_interleaved": "", "use_rope_scaling": "",
    "rotary_seq_len_interpolation_factor": "", "no_rope_freq": "", "mrope_section": "",
    "window_size": "--window-size (sliding-window attention)",
    "attention_output_gate": "", "glu_linear_offset": "", "activation_func_clamp_value": "",
    "openai_gelu": "", "squared_relu": "", "quick_geglu": "",
    "use_fused_weighted_squared_relu": "", "apply_residual_connection_post_layernorm": "",
    "experimental_attention_variant": "", "heterogeneous_layers_config_path": "",
    "heterogeneous_layers_config_encoded_json": "--heterogeneous-layers-config-path",
    "is_hybrid_model": "a hybrid (Mamba) layer pattern", "hybrid_override_pattern": "",
    "linear_attention_freq": "", "spec": "--spec (a custom layer spec)",
    "use_legacy_models": "--use-legacy-models (the legacy model)",
    "pipeline_model_parallel_layout": "", "account_for_embedding_in_pipeline_split": "",
    "account_for_loss_in_pipeline_split": "", "fp8_param_gather": "--fp8-param-gather (FP8 "
    "weights)", "fp4_param": "--fp4-param (FP4 weights)",
}
# Values other than these change the model too (None: an older Megatron-LM without the flag).
_ALLOWED_VALUES = {
    "position_embedding_type": ("rope", "learned_absolute"),
    "normalization": (None, "LayerNorm", "RMSNorm"),
    "softmax_type": (None, "vanilla"),
    "rope_type": (None, "rope"),
}
# Our flags whose Megatron-LM values mean the same and are taken as they are.
_SAME = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "rotary_base",
         "rotary_percent", "make_vocab_size_divisible_by", "padded_vocab_size",
         "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
         "init_method_std", "hidden_dropout", "attention_dropout", "seed", "tokenizer_type",
         "vocab_file", "merge_file", "tokenizer_model", "vocab_size",
         "consumed_train_samples", "consumed_valid_samples")


def _refuse_unsupported(a: dict, path: str) -> None:
    from megatron.training.checkpointing import CheckpointError

    def refuse(what):
        raise CheckpointError(f"checkpoint {path} uses {what}, which this codebase cannot "
                              "hold yet.")
    for field, what in _UNSUPPORTED.items():
        if a.get(field):
            refuse(what or "--" + field.replace("_", "-"))
    for field, allowed in _ALLOWED_VALUES.items():
        if a.get(field) not in allowed:
            refuse(f"--{field.replace('_', '-')} {a.get(field)}")
    if a.get("add_qkv_bias") and not _add_bias_linear(a):
        refuse("--add-qkv-bias without biases on the other linear layers")


def _add_bias_linear(a: dict) -> bool:
    if "disable_bias_linear" in a:  # older Megatron-LM
        return not a["disable_bias_linear"]
    return bool(a.get("add_bias_linear", True))


def _dtype_name(a: dict) -> str:
    dtype = a.get("params_dtype")
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return "bfloat16" if a.get("bf16") else "float16" if a.get("fp16") else "float32"


def _virtual_layout(a: dict):
    """(layers per virtual stage, virtual stages) as our flags hold them."""
    layers, pp = a["num_layers"], a.get("pipeline_model_parallel_size") or 1
    per_chunk = a.get("num_layers_per_virtual_pipeline_stage")
    vp = a.get("virtual_pipeline_model_parallel_size") or \
        a.get("num_virtual_stages_per_pipeline_rank")
    if per_chunk is None and vp and vp > 1 and layers % (pp * vp) == 0:
        per_chunk = layers // (pp * vp)
    if per_chunk:
        vp = layers // (pp * per_chunk)
    return per_chunk, vp if vp and vp > 1 else None


def args_from_namespace(ns: argparse.Namespace, path: str) -> dict:
    """Megatron-LM's arguments ``ns`` as a dict of our flag names. Raises CheckpointError
    naming the path and the field for a model this codebase cannot hold."""
    from megatron.core import ConfigError
    from megatron.training.checkpointing import CheckpointError
    a = vars(ns)
    for field in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"):
        if not isinstance(a.get(field), int):
            raise CheckpointError(f"checkpoint {path} records no {field} in its arguments.")
    if a.get("use_rotary_position_embeddings"):  # Megatron-LM's older spelling
        a = dict(a, position_embedding_type="rope")
    _refuse_unsupported(a, path)
    hidden, heads = a["hidden_size"], a["num_attention_heads"]
    gqa, swiglu = bool(a.get("group_query_attention")), bool(a.get("swiglu"))
    epsilon = a.get("norm_epsilon", a.get("layernorm_epsilon"))
    per_chunk, vp = _virtual_layout(a)
    args = {key: a[key] for key in _SAME if key in a}
    args.update(
        ffn_hidden_size=a.get("ffn_hidden_size") or (
            int(4 * hidden * 2 / 3 / 64) * 64 if swiglu else 4 * hidden),
        kv_channels=a.get("kv_channels") or hidden // heads,
        group_query_attention=gqa, num_query_groups=a["num_query_groups"] if gqa else heads,
        max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length"),
        position_embedding_type=a.get("position_embedding_type"),
        normalization=a.get("normalization") or "LayerNorm",
        norm_epsilon=1e-5 if epsilon is None else float(epsilon),
        qk_layernorm=bool(a.get("qk_layernorm")),
        # --apply-layernorm-1p; megatron-core's config (and newer Megatron-LM) calls it this
        apply_layernorm_1p=bool(a.get("apply_layernorm_1p") or
                                a.get("layernorm_zero_centered_gamma")),
        norm_placement="pre", embedding_norm=False, swiglu=swiglu,
        add_bias_linear=_add_bias_linear(a),
        untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights")),
        tensor_model_parallel_size=a.get("tensor_model_parallel_size") or 1,
        pipeline_model_parallel_size=a.get("pipeline_model_parallel_size") or 1,
        num_layers_per_virtual_pipeline_stage=per_chunk,
        virtual_pipeline_model_parallel_size=vp,
        sequence_parallel=bool(a.get("sequence_parallel")), params_dtype=_dtype_name(a),
        bf16=bool(a.get("bf16")), fp16=bool(a.get("fp16")), transformer_impl="local")
    try:  # the model and layout must be one this codebase builds
        from megatron.training.checkpoint_layout import config_from_args
        config_from_args(args)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} describes a model this codebase cannot "
                              f"build: {e}") from None
    return args
