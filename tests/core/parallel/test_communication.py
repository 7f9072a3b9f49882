"""Tensor-parallel communication per layer is Megatron's minimum: two all-reduces in forward
and two in backward, or with sequence parallelism two all-gather + reduce-scatter pairs each
way -- plus, in backward, the all-gathers that rebuild the column-parallel inputs, which are
kept as sequence shards to save memory (Megatron-LM makes the same trade)."""

from collections import Counter

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import mappings, set_random_seed
from megatron.core.transformer import TransformerConfig
from tests.helpers import run_distributed

COLLECTIVES = {"_all_reduce": "all-reduce", "_gather": "all-gather",
               "_reduce_scatter_first_dim": "reduce-scatter"}


def _count(num_layers, sp):
    """Collectives of one forward and one backward, counted where the layers call them."""
    counts = {"forward": Counter(), "backward": Counter()}
    phase = ["forward"]
    originals = {name: getattr(mappings, name) for name in COLLECTIVES}

    def counting(name):
        def wrapper(x, *a):
            counts[phase[0]][COLLECTIVES[name]] += 1
            return originals[name](x, *a)
        return wrapper
    for name in COLLECTIVES:
        setattr(mappings, name, counting(name))
    try:
        set_random_seed(0)
        cfg = TransformerConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4,
                                hidden_dropout=0.0, attention_dropout=0.0,
                                tensor_model_parallel_size=2, sequence_parallel=sp,
                                position_embedding_type="rope", max_position_embeddings=16)
        model = GPTModel(cfg, vocab_size=256)
        ids = torch.randint(0, 256, (2, 8))
        loss = model(ids, torch.arange(8).expand(2, 8), labels=ids).sum()
        phase[0] = "backward"
        loss.backward()
    finally:
        for name, fn in originals.items():
            setattr(mappings, name, fn)
    return counts


def _per_layer():
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    out = {}
    for sp in (False, True):
        two, four = _count(2, sp), _count(4, sp)
        out[sp] = {p: {k: (four[p][k] - two[p][k]) / 2 for k in four[p] | two[p]}
                   for p in ("forward", "backward")}
    ps.destroy_model_parallel()
    return out


def test_collectives_per_layer():
    per_layer = run_distributed(_per_layer, 2)[0]
    assert per_layer[False] == {"forward": {"all-reduce": 2}, "backward": {"all-reduce": 2}}
    assert per_layer[True] == {"forward": {"all-gather": 2, "reduce-scatter": 2},
                               "backward": {"all-gather": 2 + 2, "reduce-scatter": 2}}
