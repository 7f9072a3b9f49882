"""A local Hugging Face ``LlamaForCausalLM`` (as Pre-LN), ``Qwen3ForCausalLM`` (as Pre-LN with
--qk-layernorm) or ``Glm4ForCausalLM`` (as Peri-LN) directory, read as our one-process
tensors, with the arguments a run needs to continue.

Everything the config says is checked before a tensor is read: a field this codebase cannot
represent is named in one sentence.
"""

import json
import os
import shutil
from typing import Dict, Tuple

import hf_native
import torch
from safetensors_io import SafetensorsDirectory

from megatron.core.tokenizers import vocab_size_with_padding
from megatron.training.checkpoint_layout import VOCAB_TENSORS, one_process_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
# Tensors some exports carry that hold nothing a model needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFImportError(ValueError):
    """A Hugging Face directory this codebase cannot take; the message names the path."""


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise HFImportError(f"{model_dir} is not a directory.")
    if not os.path.isfile(path):
        raise HFImportError(f"{path} does not exist; is {model_dir} a Hugging Face model "
                            "directory?")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise HFImportError(f"{path} is not valid JSON ({e}).") from None


def _rope(config: dict, path: str) -> Tuple[float, float]:
    """(rope_theta, partial_rotary_factor), from the 5.x ``rope_parameters`` or the older
    top-level keys; any rope scaling is refused."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise HFImportError(f"{path}: rope_type {kind!r} (rope scaling) cannot be represented "
                            "here; only plain RoPE is supported.")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return float(theta), float(factor)


def args_from_hf_config(config: dict, path: str) -> Tuple[str, dict]:
    """(our architecture name, our stored-arguments dict) for a Hugging Face config."""
    arch_names = config.get("architectures") or []
    arch = hf_native.HF_CLASSES.get(arch_names[0] if arch_names else None)
    if arch is None:
        raise HFImportError(f"{path}: architecture {arch_names or config.get('model_type')} is "
                            f"not supported; expected one of {', '.join(hf_native.HF_CLASSES)}.")

    def need(field, ok, expected):
        if not ok:
            raise HFImportError(f"{path}: {field}={config.get(field)!r} cannot be represented "
                                f"here; expected {expected}.")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    groups = config.get("num_key_value_heads") or heads
    need("hidden_act", config.get("hidden_act", "silu") == "silu", "silu (SwiGLU)")
    need("num_key_value_heads", heads % groups == 0, "a divisor of num_attention_heads")
    theta, factor = _rope(config, path)
    if theta != int(theta):
        raise HFImportError(f"{path}: rope_theta={theta} is not a whole number "
                            "(--rotary-base takes an integer).")
    if arch == "qwen3":
        bias = False
        need("attention_bias", not config.get("attention_bias", False),
             "false (Qwen3's MLP has no biases; one --disable-bias-linear covers both)")
        need("partial_rotary_factor", factor == 1.0, "1.0 for Qwen3")
    elif arch == "llama":
        bias = bool(config.get("attention_bias", False))
        need("mlp_bias", bool(config.get("mlp_bias", False)) == bias,
             f"{bias} like attention_bias (one --disable-bias-linear covers both)")
        need("pretraining_tp", config.get("pretraining_tp", 1) in (1, None), "1")
        need("partial_rotary_factor", factor == 1.0, "1.0 for Llama")
    else:
        bias = False
        need("attention_bias", not config.get("attention_bias", True), "false")
        rot = int(head_dim * factor)
        need("partial_rotary_factor", rot % 2 == 0, "one giving an even rotary dimension")
    for field in ("sliding_window", "use_sliding_window"):
        need(field, not config.get(field), "none")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    args = {
        "num_layers": config["num_hidden_layers"], "hidden_size": hidden,
        "ffn_hidden_size": config["intermediate_size"], "num_attention_heads": heads,
        "group_query_attention": groups != heads, "num_query_groups": groups,
        "kv_channels": head_dim, "norm_placement": "peri" if arch == "glm4" else "pre",
        "qk_layernorm": arch == "qwen3", "apply_layernorm_1p": False,
        "mix_ln_alpha": 0.25, "embedding_norm": False, "normalization": "RMSNorm",
        "norm_epsilon": config.get("rms_norm_eps", 1e-6), "swiglu": True,
        "add_bias_linear": bias, "position_embedding_type": "rope",
        "rotary_base": int(theta), "rotary_percent": factor,
        "max_position_embeddings": config.get("max_position_embeddings", 2048),
        "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
        "hidden_dropout": 0.0, "attention_dropout": float(config.get("attention_dropout", 0.0)),
        "init_method_std": config.get("initializer_range", 0.02),
        "make_vocab_size_divisible_by": 128, "true_vocab_size": config["vocab_size"],
        "params_dtype": dtype if dtype in DTYPES else "float32",
        "bf16": dtype == "bfloat16", "fp16": dtype == "float16",
        "iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0,
    }
    args["padded_vocab_size"] = vocab_size_with_padding(config["vocab_size"], 128, 1)
    return arch, args


class HFCheckpoint:
    """The tensors of a Llama / Qwen3 / Glm4 directory under our one-process names.

    ``args`` holds what a run needs (model shape, placement, rope, vocabulary, dtype); every
    tensor's presence and shape are checked at construction, before anything is written.
    """

    def __init__(self, model_dir: str):
        self.dir = model_dir
        path = os.path.join(model_dir, "config.json")
        self.hf_config = read_config(model_dir)
        try:
            self.arch, self.args = args_from_hf_config(self.hf_config, path)
        except KeyError as e:
            raise HFImportError(f"{path} lacks the field {e.args[0]}.") from None
        self.mapping = hf_native.MAPPINGS[self.arch](self.args)
        try:
            self.files = SafetensorsDirectory(model_dir)
        except ValueError as e:
            raise HFImportError(str(e)) from None
        self.true_vocab_size = self.args["true_vocab_size"]
        self.padded_vocab_size = self.args["padded_vocab_size"]
        self._shapes = self._check_tensors()
        self.names = list(self._shapes)
        self.dtype = DTYPES[self.args["params_dtype"]]

    def _build(self, name: str, get) -> torch.Tensor:
        if name == "embedding.word_embeddings.weight":
            return get("model.embed_tokens.weight")
        if name == "output_layer.weight":
            return get("lm_head.weight")
        if name == "decoder.final_layernorm.weight":
            return get("model.norm.weight")
        index, suffix = name[len(hf_native.LAYER_PREFIX):].split(".", 1)
        return self.mapping.import_layer(suffix, lambda n: get(f"model.layers.{index}.{n}"))

    def _check_tensors(self) -> Dict[str, Tuple[int, ...]]:
        """Every tensor the model needs is there with its shape; nothing else is."""
        expected = one_process_shapes(self.args)
        used = set()

        def meta(hf_name):
            if hf_name not in self.files:
                raise HFImportError(f"{self.dir} lacks the tensor {hf_name} that "
                                    f"{self.hf_config['architectures'][0]} with this config "
                                    "needs (a missing shard or an incomplete export?).")
            used.add(hf_name)
            return torch.empty(self.files.shape(hf_name), device="meta")
        shapes = {}
        for name, want in expected.items():
            if name in VOCAB_TENSORS:
                want = (self.true_vocab_size,) + want[1:]
            before = set(used)
            try:
                built = tuple(self._build(name, meta).shape)
            except RuntimeError:  # a reshape that the tensor's shape cannot take
                built = None
            if built != want:
                sources = sorted(used - before)
                raise HFImportError(
                    f"{self.dir}: {', '.join(sources)} "
                    f"{'has shapes' if len(sources) > 1 else 'has shape'} "
                    f"{', '.join(str(self.files.shape(n)) for n in sources)}, which does not "
                    f"fit the config ({name} of shape {want} expected).")
            shapes[name] = want
        extra = [k for k in self.files.keys() if k not in used and
                 not k.endswith(IGNORED_SUFFIXES) and
                 not (k == "lm_head.weight" and "output_layer.weight" not in expected)]
        if extra:
            raise HFImportError(f"{self.dir} holds tensors this codebase cannot represent "
                                f"with this config: {', '.join(sorted(extra)[:3])}"
                                f"{' ...' if len(extra) > 3 else ''}.")
        return shapes

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[name]

    def tensor(self, name: str) -> torch.Tensor:
        return self._build(name, self.files.get).to(self.dtype)

    def copy_tokenizer(self, dest: str) -> bool:
        """Copy the tokenizer files there are into ``dest``; False when there are none."""
        found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(self.dir, n))]
        if not found:
            return False
        os.makedirs(dest, exist_ok=True)
        for name in found:
            shutil.copy(os.path.join(self.dir, name), os.path.join(dest, name))
        return True
