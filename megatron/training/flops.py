"""Model FLOPs of one global batch, for ``--log-throughput`` (TFLOP/s per device).

``num_floating_point_operations`` is Megatron-LM's formula for a dense GPT: every GEMM counts
2 FLOPs per multiply-add and 3 times (forward, weight gradient, input gradient); causal
attention counts half of the s x s scores. It counts no norms. The placements differ only in
their norms, so ``norm_floating_point_operations`` adds each norm the model holds (Peri-LN's
four per layer, Post-LN's two and no final norm, the optional embedding norm), each at the
rate Megatron-LM gives the norms of its multi-token-prediction layers: 2 * hidden FLOPs per
token forward, times 3 with the backward pass. Norms are O(s * h) against the O(s * h^2)
GEMMs, so they add about 1/(6h) per norm per layer; they are counted so that Peri-LN is not
credited with work it does not do, nor charged less for work it does.
"""

from megatron.core.transformer.layer import LAYER_CLASSES
from megatron.training.arguments import transformer_config_from_args

_FWD_BWD, _FMA = 3, 2


def num_floating_point_operations(args, batch_size: int) -> float:
    """Megatron-LM's ``num_floating_point_operations`` for a dense GPT (no MoE/MTP/MLA):
    GEMM FLOPs of ``batch_size`` sequences of ``args.seq_length`` tokens."""
    tokens = batch_size * args.seq_length
    h, layers = args.hidden_size, args.num_layers
    query = args.kv_channels * args.num_attention_heads
    key_value = args.kv_channels * args.num_query_groups
    ffn_expansion = 3 if args.swiglu else 2
    mlp = _FWD_BWD * _FMA * h * args.ffn_hidden_size * ffn_expansion
    attention_linear = _FWD_BWD * _FMA * (h * (query + 2 * key_value) + query * h)
    attention_core = _FWD_BWD * _FMA * query / 2 * 2  # causal half of QK^T, and of (QK^T)V
    logits = _FWD_BWD * _FMA * h * args.padded_vocab_size
    return tokens * ((mlp + attention_linear) * layers + logits) + \
        batch_size * args.seq_length ** 2 * attention_core * layers


def count_norms(args) -> int:
    """Norm modules in the whole model under ``--norm-placement`` (and ``--embedding-norm``)."""
    config = transformer_config_from_args(args)
    per_layer = sum(len(LAYER_CLASSES[config.layer_placement(n)].norm_names)
                    for n in range(1, config.num_layers + 1))
    return per_layer + int(config.has_final_norm) + int(config.embedding_norm)


def norm_floating_point_operations(args, batch_size: int) -> float:
    """FLOPs of every norm: 3 (fwd + bwd) x 2 x hidden per token per norm (Megatron-LM's rate
    for its MTP norms)."""
    return batch_size * args.seq_length * _FWD_BWD * _FMA * args.hidden_size * count_norms(args)


def model_floating_point_operations(args, batch_size: int) -> float:
    """What ``--log-throughput`` counts: Megatron's GEMM FLOPs plus this placement's norms."""
    return num_floating_point_operations(args, batch_size) + \
        norm_floating_point_operations(args, batch_size)


def throughput_tflops_per_device(args, seconds_per_iteration: float, batch_size: int) -> float:
    """TFLOP/s per device (GPU, or CPU process): the model FLOPs of a global batch of
    ``batch_size`` sequences over the iteration time and ``args.world_size``, as Megatron-LM
    divides them."""
    flops = model_floating_point_operations(args, batch_size)
    return flops / (seconds_per_iteration * 10 ** 12 * args.world_size)
