"""Export mapping for the trust_remote_code model in modeling_megatron_gpt.py.

That model holds every placement (pre, post, peri, mix), both norms, GELU or SwiGLU, learned
or rotary positions, with our own parameter names, so an export is a rename (``remote_name``),
a trim of the padded vocabulary rows, a config.json (``remote_config``) and a copy of the
modeling file (``modeling_file_path``) beside the weights.
"""

import os
import re

REMOTE_MODULE = "modeling_megatron_gpt"  # file name without .py
MODEL_TYPE = "megatron_gpt_periln"

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}

# Our TP=1 state-dict names; everything but the output layer sits under `model.` unchanged.
_NORM = r"(input_layernorm|pre_mlp_layernorm|post_self_attn_layernorm|post_mlp_layernorm" \
        r"|self_attn_residual_layernorm|mlp_residual_layernorm)"
_OUR_NAMES = re.compile(
    r"embedding\.(word_embeddings|position_embeddings)\.weight"
    r"|embedding\.embedding_norm\.(weight|bias)"
    r"|decoder\.layers\.\d+\.(self_attention\.linear_(qkv|proj)|self_attention\.[qk]_layernorm"
    r"|mlp\.linear_fc[12]"
    rf"|{_NORM})\.(weight|bias)"
    r"|decoder\.final_layernorm\.(weight|bias)")


def remote_config(args: dict, vocab_size: int, special_ids: dict) -> dict:
    """config.json contents (with auto_map and architectures) for a model described by our
    stored training arguments ``args`` (flag names with underscores, as checkpoints save them).

    ``vocab_size``: the trimmed (real) vocabulary; ``special_ids``: bos_token_id, eos_token_id
    and pad_token_id (missing ones become None).
    """
    heads, hidden = args["num_attention_heads"], args["hidden_size"]
    groups = args.get("num_query_groups") or heads
    if "group_query_attention" in args and not args["group_query_attention"]:
        groups = heads  # arguments.py does the same when GQA is off
    swiglu = bool(args.get("swiglu", False))
    ffn = args.get("ffn_hidden_size") or (int(4 * hidden * 2 / 3 / 64) * 64 if swiglu
                                          else 4 * hidden)
    placement = str(args.get("norm_placement", "pre"))
    placement = placement.split(".")[-1].lower()  # tolerate "NormPlacement.PERI"
    params_dtype = str(args.get("params_dtype", "float32"))
    if params_dtype not in _DTYPES:
        raise ValueError(f"params_dtype={params_dtype!r} is not one of float32, bfloat16, "
                         "float16; the checkpoint's arguments look damaged.")
    dtype = _DTYPES[params_dtype]
    config = {
        "architectures": ["MegatronGPTForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{REMOTE_MODULE}.MegatronGPTConfig",
            "AutoModel": f"{REMOTE_MODULE}.MegatronGPTModel",
            "AutoModelForCausalLM": f"{REMOTE_MODULE}.MegatronGPTForCausalLM",
        },
        "model_type": MODEL_TYPE,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "num_hidden_layers": args["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": args.get("kv_channels") or hidden // heads,
        "intermediate_size": ffn,
        "max_position_embeddings": args.get("max_position_embeddings") or args["seq_length"],
        "norm_placement": placement,
        "mix_ln_alpha": args.get("mix_ln_alpha", 0.25),
        "embedding_norm": bool(args.get("embedding_norm", False)),
        "normalization": args.get("normalization", "LayerNorm"),
        "norm_epsilon": args.get("norm_epsilon", 1e-5),
        "qk_layernorm": bool(args.get("qk_layernorm", False)),
        "gated_linear_unit": swiglu,
        "add_bias_linear": bool(args.get("add_bias_linear", True)),
        "position_embedding_type": args.get("position_embedding_type", "learned_absolute"),
        "rotary_base": args.get("rotary_base", 10000),
        "rotary_percent": args.get("rotary_percent", 1.0),
        "hidden_dropout": args.get("hidden_dropout", 0.1),
        "attention_dropout": args.get("attention_dropout", 0.1),
        "initializer_range": args.get("init_method_std", 0.02),
        "tie_word_embeddings": not args.get("untie_embeddings_and_output_weights", False),
        "use_cache": True,
        "torch_dtype": dtype,  # transformers 4 reads this name
        "dtype": dtype,  # transformers 5 reads this one
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[key] = special_ids.get(key)
    return config


def remote_name(name: str) -> str:
    """Our TP=1 state-dict name -> the name in MegatronGPTForCausalLM."""
    if name == "output_layer.weight":
        return "lm_head.weight"
    if _OUR_NAMES.fullmatch(name):
        return "model." + name
    raise ValueError(f"{name!r} is not a parameter of our GPTModel at tensor-parallel size 1; "
                     "merge tensor-parallel shards and drop non-parameter entries before export.")


def modeling_file_path() -> str:
    """Path of modeling_megatron_gpt.py, to copy beside the exported weights."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), REMOTE_MODULE + ".py")
