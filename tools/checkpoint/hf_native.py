"""The native Hugging Face classes that hold some of our models exactly, and the tensor
mapping both ways.

- ``LlamaForCausalLM``: Pre-LN, RMSNorm, SwiGLU, full RoPE (biases on all linear layers or
  none).
- ``Qwen3ForCausalLM``: Llama's layer with RMSNorms of queries and keys over head_dim before
  RoPE (``q_norm`` / ``k_norm``: our ``--qk-layernorm``), no biases.
- ``Glm4ForCausalLM``: Peri-LN, RMSNorm, SwiGLU, RoPE, no biases. Its layer is
  ``x + post_self_attn_layernorm(attn(input_layernorm(x)))`` then
  ``x + post_mlp_layernorm(mlp(post_attention_layernorm(x)))``, which is Peri-LN; its RoPE
  pairs interleaved channels (2i, 2i+1) where ours pairs (i, i + r/2), so the query and key
  rows of each head are permuted.

With ``--embedding-norm`` the norm (of a token's embedding alone: no learned positions) is
folded into the embedding table; the output layer then keeps the unnormalized table, untied.
With ``--apply-layernorm-1p`` every stored gain g is exported as 1 + g (``fold_one_plus``), so
the same classes hold it exactly; an import never produces zero-centred gains.
"""

import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

LAYER_PREFIX = "decoder.layers."
_NORM_GAIN = re.compile(r".*(layernorm|embedding_norm)\.weight")


def native_architecture(args: dict) -> Tuple[Optional[str], str]:
    """('llama' | 'qwen3' | 'glm4', '') when a native class holds the model ``args`` describe
    exactly, else (None, the reason)."""
    placement = args.get("norm_placement", "pre")
    common = [
        (args.get("normalization") == "RMSNorm", f"--normalization {args.get('normalization')}"),
        (bool(args.get("swiglu")), "a GELU MLP (no --swiglu)"),
        (args.get("position_embedding_type") == "rope",
         f"--position-embedding-type {args.get('position_embedding_type')}"),
    ]
    if placement == "pre":
        checks = common + [(args.get("rotary_percent", 1.0) == 1.0,
                            f"--rotary-percent {args.get('rotary_percent')}")]
        arch = "llama"
        if args.get("qk_layernorm"):
            checks.append((not args.get("add_bias_linear", True),
                           "--qk-layernorm with biases (no --disable-bias-linear)"))
            arch = "qwen3"
    elif args.get("qk_layernorm"):
        return None, f"--qk-layernorm with --norm-placement {placement}"
    elif placement == "peri":
        rot = rotary_dim(args)
        checks = common + [
            (not args.get("add_bias_linear", True), "biases (no --disable-bias-linear)"),
            (rot == int(args["kv_channels"] * args.get("rotary_percent", 1.0)),
             f"an odd rotary dimension (--rotary-percent {args.get('rotary_percent')})")]
        arch = "glm4"
    else:
        return None, f"--norm-placement {placement}"
    reasons = [why for ok, why in checks if not ok]
    return (None, ", ".join(reasons)) if reasons else (arch, "")


def fold_one_plus(name: str, t: torch.Tensor) -> torch.Tensor:
    """A norm's gain as an exported model applies it: 1 + the stored zero-centred gain (in
    the tensor's dtype, as our norm adds it). Other tensors pass unchanged."""
    return t + 1 if _NORM_GAIN.fullmatch(name) else t


def rotary_dim(args: dict) -> int:
    dim = int(args["kv_channels"] * args.get("rotary_percent", 1.0))
    return dim - dim % 2


def _shape(args: dict):
    heads, groups = args["num_attention_heads"], args["num_query_groups"]
    return heads, groups, heads // groups, args["kv_channels"]


def split_qkv(qkv: torch.Tensor, args: dict) -> Tuple[torch.Tensor, ...]:
    """Our fused rows, per query group [q_1 .. q_(h/g), k, v], as separate q, k, v."""
    heads, groups, per_group, d = _shape(args)
    w = qkv.reshape(groups, (per_group + 2) * d, *qkv.shape[1:])
    q, k, v = w.split([per_group * d, d, d], dim=1)
    rest = tuple(qkv.shape[1:])
    return (q.reshape(heads * d, *rest), k.reshape(groups * d, *rest),
            v.reshape(groups * d, *rest))


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: dict) -> torch.Tensor:
    heads, groups, per_group, d = _shape(args)
    rest = tuple(q.shape[1:])
    w = torch.cat([q.reshape(groups, per_group * d, *rest), k.reshape(groups, d, *rest),
                   v.reshape(groups, d, *rest)], dim=1)
    return w.reshape((heads + 2 * groups) * d, *rest)


def rope_permutation(args: dict) -> torch.Tensor:
    """Row order within a head that turns our rotary pairs (i, i + r/2) into interleaved
    pairs (2i, 2i + 1); channels past the rotary dimension stay."""
    d, r = args["kv_channels"], rotary_dim(args)
    order = [c for i in range(r // 2) for c in (i, i + r // 2)] + list(range(r, d))
    return torch.tensor(order)


def _permute_heads(w: torch.Tensor, order: torch.Tensor, d: int) -> torch.Tensor:
    heads = w.shape[0] // d
    return w.reshape(heads, d, *w.shape[1:])[:, order].reshape(w.shape)


class NativeMapping:
    """Our one-process tensor names <-> a native class's, for one architecture."""

    hf_class = ""
    layer_names: Dict[str, str] = {}  # renamed one to one

    def __init__(self, args: dict):
        self.args = args

    def common_config(self, vocab_size: int, special: dict, dtype: str) -> dict:
        """config.json fields both native classes share (Hugging Face's names)."""
        a = self.args
        return dict(
            architectures=[self.hf_class], vocab_size=vocab_size,
            hidden_size=a["hidden_size"], intermediate_size=a["ffn_hidden_size"],
            num_hidden_layers=a["num_layers"], num_attention_heads=a["num_attention_heads"],
            num_key_value_heads=a["num_query_groups"], head_dim=a["kv_channels"],
            hidden_act="silu", max_position_embeddings=a["max_position_embeddings"],
            rms_norm_eps=a["norm_epsilon"], rope_theta=float(a["rotary_base"]),
            tie_word_embeddings=tied_output(a), dtype=dtype, **special)

    # export: ours -> theirs ------------------------------------------------------------
    def export_layer(self, suffix: str, t: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
        if suffix in self.layer_names:
            return [(self.layer_names[suffix], t)]
        kind = suffix.rsplit(".", 1)[-1]
        if suffix.startswith("self_attention.linear_qkv."):
            q, k, v = self.export_qkv(*split_qkv(t, self.args))
            return [(f"self_attn.q_proj.{kind}", q), (f"self_attn.k_proj.{kind}", k),
                    (f"self_attn.v_proj.{kind}", v)]
        if suffix.startswith("mlp.linear_fc1."):
            return self.export_fc1(kind, t)
        raise KeyError(f"{self.hf_class} has no place for {LAYER_PREFIX}N.{suffix}")

    def export_qkv(self, q, k, v):
        return q, k, v

    def export_fc1(self, kind, t):
        gate, up = t.chunk(2, dim=0)
        return [(f"mlp.gate_proj.{kind}", gate), (f"mlp.up_proj.{kind}", up)]

    # import: theirs -> ours ------------------------------------------------------------
    def import_layer(self, suffix: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if suffix in self.layer_names:
            return get(self.layer_names[suffix])
        kind = suffix.rsplit(".", 1)[-1]
        if suffix.startswith("self_attention.linear_qkv."):
            q, k, v = self.import_qkv(get(f"self_attn.q_proj.{kind}"),
                                      get(f"self_attn.k_proj.{kind}"),
                                      get(f"self_attn.v_proj.{kind}"))
            return merge_qkv(q, k, v, self.args)
        if suffix.startswith("mlp.linear_fc1."):
            return self.import_fc1(kind, get)
        raise KeyError(f"{self.hf_class} has no place for {LAYER_PREFIX}N.{suffix}")

    def import_qkv(self, q, k, v):
        return q, k, v

    def import_fc1(self, kind, get):
        return torch.cat([get(f"mlp.gate_proj.{kind}"), get(f"mlp.up_proj.{kind}")])


class LlamaMapping(NativeMapping):
    hf_class = "LlamaForCausalLM"
    layer_names = {
        "input_layernorm.weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
        "mlp.linear_fc2.weight": "mlp.down_proj.weight",
        "mlp.linear_fc2.bias": "mlp.down_proj.bias",
    }

    def hf_config(self, vocab_size: int, special: dict, dtype: str) -> dict:
        bias = bool(self.args["add_bias_linear"])
        return dict(self.common_config(vocab_size, special, dtype), model_type="llama",
                    attention_bias=bias, mlp_bias=bias)


class Glm4Mapping(NativeMapping):
    hf_class = "Glm4ForCausalLM"
    layer_names = {
        "input_layernorm.weight": "input_layernorm.weight",
        "post_self_attn_layernorm.weight": "post_self_attn_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "post_mlp_layernorm.weight": "post_mlp_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    }

    def __init__(self, args: dict):
        super().__init__(args)
        self.order = rope_permutation(args)
        self.inverse = torch.argsort(self.order)

    def export_qkv(self, q, k, v):
        d = self.args["kv_channels"]
        return _permute_heads(q, self.order, d), _permute_heads(k, self.order, d), v

    def import_qkv(self, q, k, v):
        d = self.args["kv_channels"]
        return _permute_heads(q, self.inverse, d), _permute_heads(k, self.inverse, d), v

    def export_fc1(self, kind, t):
        return [(f"mlp.gate_up_proj.{kind}", t)]  # [gate; up], as ours

    def import_fc1(self, kind, get):
        return get(f"mlp.gate_up_proj.{kind}")

    def hf_config(self, vocab_size: int, special: dict, dtype: str) -> dict:
        return dict(self.common_config(vocab_size, special, dtype), model_type="glm4",
                    attention_bias=False,
                    partial_rotary_factor=rotary_dim(self.args) / self.args["kv_channels"])


class Qwen3Mapping(LlamaMapping):
    hf_class = "Qwen3ForCausalLM"
    layer_names = dict(LlamaMapping.layer_names, **{
        "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    })

    def hf_config(self, vocab_size: int, special: dict, dtype: str) -> dict:
        return dict(self.common_config(vocab_size, special, dtype), model_type="qwen3",
                    attention_bias=False, use_sliding_window=False)


MAPPINGS = {"llama": LlamaMapping, "qwen3": Qwen3Mapping, "glm4": Glm4Mapping}
HF_CLASSES = {cls.hf_class: name for name, cls in MAPPINGS.items()}


def tied_output(args: dict) -> bool:
    """Whether the export ties lm_head to the embedding: not when an embedding norm is
    folded into the table (the output layer keeps the unnormalized one)."""
    return not args.get("untie_embeddings_and_output_weights") and \
        not args.get("embedding_norm")


def fold_embedding_norm(table: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm applied to every row of the embedding table (computed in fp32)."""
    out = torch.nn.functional.rms_norm(table.float(), (table.shape[-1],), gain.float(), eps)
    return out.to(table.dtype)
