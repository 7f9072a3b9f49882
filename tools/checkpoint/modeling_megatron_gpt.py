"""Megatron GPT (Pre-, Post-, Peri- and Mix-LN) as a Hugging Face model, loaded with
``trust_remote_code=True``.

This file is copied beside weights exported from megatron-periln. It needs only the Python
standard library, torch and transformers. Parameter names are those of our GPTModel at
tensor-parallel size 1 under ``model.`` (``model.decoder.layers.0.mlp.linear_fc1.weight``), and
``lm_head.weight`` for our ``output_layer.weight``, so weights copy over without reshaping.

One residual step for a sublayer F (attention or MLP) and a norm N, by ``norm_placement``::

    pre   x ─┬─ N ─ F ─(+)─>               final norm before lm_head
             └─────────┘
    post  x ─┬─ F ─(+)─ N ─>               no final norm (every layer already ends in one)
             └─────┘
    peri  x ─┬─ N_in ─ F ─ N_out ─(+)─>    final norm before lm_head
             └─────────────────────┘
    mix   post for the first floor(mix_ln_alpha * num_layers + 0.5) layers, pre for the rest;
          final norm before lm_head

Positions come from ``position_ids`` (``generate`` derives them from the attention mask, so a
left-padded prompt gets the positions it would have alone); keys and values go through
``Cache.update(key, value, layer_idx)``.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from transformers.generation import GenerationMixin
except ImportError:  # transformers < 4.38 exports it only from generation.utils
    from transformers.generation.utils import GenerationMixin

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers 5 renamed the cache field of model outputs from past_key_values to cache.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)

PLACEMENTS = ("pre", "post", "peri", "mix")


class MegatronGPTConfig(PretrainedConfig):
    """The shape and normalization placement of a Megatron GPT (see the module docstring)."""

    model_type = "megatron_gpt_periln"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size=50257, hidden_size=1024, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=None, head_dim=None,
                 intermediate_size=None, max_position_embeddings=2048, norm_placement="pre",
                 mix_ln_alpha=0.25, embedding_norm=False, normalization="LayerNorm",
                 norm_epsilon=1e-5, qk_layernorm=False, gated_linear_unit=False,
                 add_bias_linear=True,
                 position_embedding_type="learned_absolute", rotary_base=10000,
                 rotary_percent=1.0, hidden_dropout=0.1, attention_dropout=0.1,
                 initializer_range=0.02, use_cache=True, tie_word_embeddings=True,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size  # real (trimmed) vocabulary: rows of the embedding and lm_head
        self.hidden_size = hidden_size  # width of the residual stream
        self.num_hidden_layers = num_hidden_layers  # transformer layers
        self.num_attention_heads = num_attention_heads  # query heads
        # key/value heads (Megatron's num_query_groups); equal to the query heads without GQA
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads  # Megatron's kv_channels
        # MLP inner width (Megatron's ffn_hidden_size)
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings  # rows of the learned position table
        self.norm_placement = norm_placement  # pre, post, peri or mix
        self.mix_ln_alpha = mix_ln_alpha  # fraction of leading Post-LN layers under mix
        self.embedding_norm = embedding_norm  # a norm on the embedding output
        self.normalization = normalization  # LayerNorm or RMSNorm
        self.norm_epsilon = norm_epsilon  # epsilon of every norm
        # a norm of queries and one of keys per layer, over head_dim, before RoPE
        self.qk_layernorm = qk_layernorm
        self.gated_linear_unit = gated_linear_unit  # SwiGLU (linear_fc1 = [gate; up]), else GELU
        self.add_bias_linear = add_bias_linear  # biases on all four linear layers of a layer
        self.position_embedding_type = position_embedding_type  # learned_absolute or rope
        self.rotary_base = rotary_base  # RoPE base period
        self.rotary_percent = rotary_percent  # fraction of each head's channels RoPE rotates
        self.hidden_dropout = hidden_dropout  # dropout on the embedding and each sublayer output
        self.attention_dropout = attention_dropout  # dropout on the attention probabilities
        self.initializer_range = initializer_range  # std of the normal init of a fresh model
        self.use_cache = use_cache  # return a key/value cache from forward
        self.tie_word_embeddings = tie_word_embeddings  # lm_head shares the word embeddings
        self.bos_token_id = bos_token_id  # beginning-of-sequence token
        self.eos_token_id = eos_token_id  # end-of-sequence token (generate stops on it)
        self.pad_token_id = pad_token_id  # padding token
        self._check()

    def _check(self):
        choices = {"norm_placement": PLACEMENTS, "normalization": ("LayerNorm", "RMSNorm"),
                   "position_embedding_type": ("learned_absolute", "rope")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; expected one "
                                 f"of {', '.join(allowed)}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} does not divide "
                             f"num_attention_heads={self.num_attention_heads}.")

    @property
    def num_post_ln_layers(self) -> int:
        """Leading Post-LN layers under mix: round(alpha * L), halves rounded up."""
        return int(math.floor(self.mix_ln_alpha * self.num_hidden_layers + 0.5))

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (even)."""
        dim = int(self.head_dim * self.rotary_percent)
        return dim - dim % 2


def build_norm(config: MegatronGPTConfig, size: Optional[int] = None) -> nn.Module:
    cls = nn.LayerNorm if config.normalization == "LayerNorm" else nn.RMSNorm
    return cls(size or config.hidden_size, eps=config.norm_epsilon)


def rotary_cos_sin(position_ids: torch.Tensor, config: MegatronGPTConfig):
    """cos and sin [b, 1, s, rotary_dim] (fp32) of the angles at ``position_ids`` [b, s]."""
    dim = config.rotary_dim
    steps = torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device)
    inv_freq = 1.0 / (config.rotary_base ** (steps / dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos_sin) -> torch.Tensor:
    """Rotate the first rotary_dim channels of t [b, heads, s, d]; channel i pairs with
    i + rotary_dim / 2 (non-interleaved, as Megatron does)."""
    cos, sin = (r.to(t.dtype) for r in cos_sin)
    rot, rest = t[..., :cos.shape[-1]], t[..., cos.shape[-1]:]
    r1, r2 = rot.chunk(2, dim=-1)
    rot = rot * cos + torch.cat((-r2, r1), dim=-1) * sin
    return torch.cat((rot, rest), dim=-1)


def attention_mask_for(attention_mask: Optional[torch.Tensor], q_len: int, past: int,
                       device: torch.device):
    """None for plain causal attention (SDPA's is_causal), else a boolean mask
    [b or 1, 1, q_len, past + q_len] with True where a query may attend.

    ``attention_mask``: None, a 2D padding mask [b, past + q_len] (1 = token, 0 = padding) or a
    ready 4D mask, returned as it is.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and past == 0:
        return None
    kv_len = past + q_len
    query = torch.arange(past, kv_len, device=device)[:, None]
    key = torch.arange(kv_len, device=device)[None]
    allowed = (key <= query)[None, None]
    if no_padding:
        return allowed
    if attention_mask.shape[-1] != kv_len:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache "
                         f"and input hold {kv_len}; pass a mask over all of them.")
    # A padding query would attend to nothing (a NaN row); let it see itself instead. Real
    # tokens are unaffected: they always see themselves.
    return (allowed & attention_mask[:, None, None, :].bool()) | (key == query)


class SelfAttention(nn.Module):
    """linear_qkv -> [q_layernorm, k_layernorm] -> RoPE -> cache -> SDPA -> linear_proj.
    linear_qkv's rows are laid out per query group: [q_1 .. q_(heads/groups), k, v] for
    group 1, then group 2, ..."""

    def __init__(self, config: MegatronGPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.groups, self.head_dim = (config.num_attention_heads,
                                                  config.num_key_value_heads, config.head_dim)
        self.dropout = config.attention_dropout
        bias = config.add_bias_linear
        qkv_size = (self.heads + 2 * self.groups) * self.head_dim
        self.linear_qkv = nn.Linear(config.hidden_size, qkv_size, bias=bias)
        self.linear_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)
        if config.qk_layernorm:
            self.q_layernorm = build_norm(config, self.head_dim)
            self.k_layernorm = build_norm(config, self.head_dim)
        else:
            self.q_layernorm = self.k_layernorm = None

    def forward(self, x, mask, rope, cache):
        b, s, _ = x.shape
        q_per_group = self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, (q_per_group + 2) * self.head_dim)
        q, k, v = qkv.split([q_per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(b, s, self.heads, self.head_dim)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        gqa = {}
        if q_per_group > 1:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                k, v = (t.repeat_interleave(q_per_group, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and s > 1,
            dropout_p=self.dropout if self.training else 0.0, **gqa)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    """linear_fc1 -> GELU (exact) or SwiGLU (rows [gate; up], silu(gate) * up) -> linear_fc2."""

    def __init__(self, config: MegatronGPTConfig):
        super().__init__()
        self.gated = config.gated_linear_unit
        fc1_size = config.intermediate_size * (2 if self.gated else 1)
        self.linear_fc1 = nn.Linear(config.hidden_size, fc1_size, bias=config.add_bias_linear)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size,
                                    bias=config.add_bias_linear)

    def forward(self, x):
        h = self.linear_fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.linear_fc2(F.silu(gate) * up)
        return self.linear_fc2(F.gelu(h))


class TransformerLayer(nn.Module):
    """Attention, MLP and the norms named in ``norm_names`` (our layer.py's names)."""

    norm_names: tuple = ()

    def __init__(self, config: MegatronGPTConfig, layer_idx: int):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.self_attention = SelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        for name in self.norm_names:
            self.add_module(name, build_norm(config))

    def dropout(self, x):
        return F.dropout(x, self.hidden_dropout, self.training)


class PreNormLayer(TransformerLayer):
    """x = x + F(N(x))"""

    norm_names = ("input_layernorm", "pre_mlp_layernorm")

    def forward(self, x, mask, rope, cache):
        x = x + self.dropout(self.self_attention(self.input_layernorm(x), mask, rope, cache))
        return x + self.dropout(self.mlp(self.pre_mlp_layernorm(x)))


class PostNormLayer(TransformerLayer):
    """x = N(x + F(x))"""

    norm_names = ("self_attn_residual_layernorm", "mlp_residual_layernorm")

    def forward(self, x, mask, rope, cache):
        x = self.self_attn_residual_layernorm(
            x + self.dropout(self.self_attention(x, mask, rope, cache)))
        return self.mlp_residual_layernorm(x + self.dropout(self.mlp(x)))


class PeriNormLayer(TransformerLayer):
    """x = x + N_out(F(N_in(x)))"""

    norm_names = ("input_layernorm", "post_self_attn_layernorm",
                  "pre_mlp_layernorm", "post_mlp_layernorm")

    def forward(self, x, mask, rope, cache):
        x = x + self.dropout(self.post_self_attn_layernorm(
            self.self_attention(self.input_layernorm(x), mask, rope, cache)))
        return x + self.dropout(self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(x))))


LAYER_CLASSES = {"pre": PreNormLayer, "post": PostNormLayer, "peri": PeriNormLayer}


def layer_class(config: MegatronGPTConfig, layer_idx: int):
    """Mix-LN: Post-LN for the first num_post_ln_layers layers, Pre-LN after them."""
    if config.norm_placement == "mix":
        return PostNormLayer if layer_idx < config.num_post_ln_layers else PreNormLayer
    return LAYER_CLASSES[config.norm_placement]


class Embedding(nn.Module):
    """word_embeddings (+ position_embeddings) -> [embedding_norm] -> dropout."""

    def __init__(self, config: MegatronGPTConfig):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.max_positions = config.max_position_embeddings
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size) \
            if config.position_embedding_type == "learned_absolute" else None
        self.embedding_norm = build_norm(config) if config.embedding_norm else None

    def forward(self, input_ids, position_ids, inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.position_embeddings is not None:
            if position_ids.numel() and int(position_ids.max()) >= self.max_positions:
                raise ValueError(f"position {int(position_ids.max())} is beyond the "
                                 f"{self.max_positions} learned positions of this model; "
                                 "shorten the prompt or max_new_tokens.")
            x = x + self.position_embeddings(position_ids)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return F.dropout(x, self.hidden_dropout, self.training)


class TransformerBlock(nn.Module):
    """The layers, then final_layernorm for every placement but post."""

    def __init__(self, config: MegatronGPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(layer_class(config, i)(config, i)
                                    for i in range(config.num_hidden_layers))
        self.final_layernorm = build_norm(config) if config.norm_placement != "post" else None

    def forward(self, x, mask, rope, cache):
        for layer in self.layers:
            x = layer(x, mask, rope, cache)
        return x if self.final_layernorm is None else self.final_layernorm(x)


class MegatronGPTPreTrainedModel(PreTrainedModel):
    """Shared settings; fresh weights get transformers' default init (normal(0,
    initializer_range) for linear and embedding weights, ones and zeros for norms)."""

    config_class = MegatronGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["PreNormLayer", "PostNormLayer", "PeriNormLayer"]
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4.4x: use Cache objects in generate


def _new_cache(config):
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers < 4.56 builds it without the config
        return DynamicCache()


def _default_positions(attention_mask, s, past, device):
    """Positions counted over real tokens when a 2D padding mask is given (left padding),
    else past .. past + s - 1."""
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[:, -s:]
    return torch.arange(past, past + s, device=device)[None]


class MegatronGPTModel(MegatronGPTPreTrainedModel):
    """Embedding and decoder; returns the last hidden states [b, s, h] and the cache."""

    def __init__(self, config: MegatronGPTConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.decoder = TransformerBlock(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, past_key_values=None, return_dict=None,
                **kwargs):
        cache = cache if cache is not None else past_key_values  # transformers 4 name
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        s = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = _new_cache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = _default_positions(attention_mask, s, past, self.device)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        x = self.embedding(input_ids, position_ids, inputs_embeds)
        rope = rotary_cos_sin(position_ids, self.config) \
            if self.config.position_embedding_type == "rope" else None
        x = self.decoder(x, attention_mask_for(attention_mask, s, past, x.device), rope, cache)
        out = BaseModelOutputWithPast(last_hidden_state=x,
                                      **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()


class MegatronGPTForCausalLM(MegatronGPTPreTrainedModel, GenerationMixin):
    """MegatronGPTModel under ``model.`` and the output layer ``lm_head`` (Megatron's
    output_layer), tied to the word embeddings when ``config.tie_word_embeddings``."""

    # transformers 5: {tied parameter: its source}; transformers 4: the tied parameters, tied
    # through get_output_embeddings / get_input_embeddings.
    _tied_weights_keys = {"lm_head.weight": "model.embedding.word_embeddings.weight"} \
        if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: MegatronGPTConfig):
        super().__init__(config)
        self.model = MegatronGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.model.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                past_key_values=None, return_dict=None, **kwargs):
        """Logits [b, s, vocab_size]; with ``labels`` [b, s] also the mean next-token loss
        over labels that are not -100. ``logits_to_keep``: only the last n positions' logits
        (0: all), as generate asks."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, past_key_values=past_key_values)
        hidden = out.last_hidden_state
        if labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif labels is None and isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None if labels is None else \
            causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        result = CausalLMOutputWithPast(loss=loss, logits=logits,
                                        **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Cross entropy of token t's logits against label t + 1, in fp32; the mean over labels
    that are not -100, or their sum over ``num_items_in_batch`` (gradient accumulation)."""
    logits = logits[:, :-1].flatten(0, 1).float()
    labels = labels[:, 1:].flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items_in_batch
