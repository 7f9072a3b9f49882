"""GPTModel split over 2 and 4 tensor-parallel ranks (with and without sequence parallelism)
computes what one process computes: logits, loss and every gradient."""

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.distributed.finalize_model_grads import allreduce_sequence_parallel_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.tensor_parallel.utils import gather_full_parameter, merge_shards
from megatron.core.transformer import TransformerConfig
from tests.helpers import run_distributed

VOCAB = 512
# Each placement also exercises other options, so the split of every kind of layer is checked.
PLACEMENTS = {
    "pre": dict(normalization="LayerNorm"),
    "post": dict(position_embedding_type="rope"),
    "peri": dict(normalization="RMSNorm", position_embedding_type="rope",
                 gated_linear_unit=True, add_bias_linear=False, embedding_norm=True),
    "mix": dict(normalization="RMSNorm", gated_linear_unit=True,
                share_embeddings_and_output_weights=False),
}


def make_config(placement, tp=1, sp=False):
    return TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=8,
                             num_query_groups=4, norm_placement=placement, hidden_dropout=0.0,
                             attention_dropout=0.0, max_position_embeddings=32,
                             tensor_model_parallel_size=tp, sequence_parallel=sp,
                             **PLACEMENTS[placement])


def run_model(model, ids):
    """Logits (vocabulary shards gathered), mean loss, and every parameter's whole gradient."""
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    logits = model(ids, pos)
    loss = model(ids, pos, labels=ids.roll(-1, dims=1)).mean()
    loss.backward()
    allreduce_sequence_parallel_grads([model])
    group = ps.get_tensor_model_parallel_group()
    if group is not None:
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits.detach().contiguous(), group=group)
        logits = merge_shards(parts, -1)
    grads = {name: _full_grad(p) for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _full_grad(param):
    grad = param.grad.detach()
    grad.tensor_model_parallel = getattr(param, "tensor_model_parallel", False)
    grad.partition_dim = getattr(param, "partition_dim", 0)
    grad.partition_stride = getattr(param, "partition_stride", 1)
    return gather_full_parameter(grad)


def assert_same_run(got, ref):
    """``run_model``'s results agree. fp32 with sums split across ranks: agreement to a few
    ulps of the values involved; 1e-5 relative (plus 1e-6 absolute for entries near zero),
    1e-4 for gradients (longer sums)."""
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=0)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def compare_with_one_process(tp, reference_config, split_config, rename=lambda name: name):
    """For every placement, with and without sequence parallelism: failures of
    ``split_config(placement, tp, sp)`` at ``tp`` ranks against ``reference_config(placement)``
    in one process (gradients matched by ``rename`` of the split model's names)."""
    failures = []
    for placement in PLACEMENTS:
        for sp in (False, True):
            ps.destroy_model_parallel()
            torch.manual_seed(0)
            ids = torch.randint(0, VOCAB, (2, 16))
            set_random_seed(7)
            ref = run_model(GPTModel(reference_config(placement), VOCAB), ids)
            ps.initialize_model_parallel(tensor_model_parallel_size=tp)
            set_random_seed(7)
            logits, loss, grads = run_model(GPTModel(split_config(placement, tp, sp), VOCAB),
                                            ids)
            ps.destroy_model_parallel()
            try:
                assert_same_run((logits, loss, {rename(k): v for k, v in grads.items()}), ref)
            except AssertionError as e:
                failures.append(f"{placement} tp={tp} sp={sp}: {str(e)[:400]}")
    return failures


def _compare_on_ranks(tp):
    dist.init_process_group("gloo")
    failures = compare_with_one_process(tp, make_config, make_config)
    dist.destroy_process_group()
    return failures


def test_tensor_parallel_size_2():
    assert run_distributed(_compare_on_ranks, 2, 2) == [[], []]


def test_tensor_parallel_size_4():
    assert run_distributed(_compare_on_ranks, 4, 4) == [[]] * 4
