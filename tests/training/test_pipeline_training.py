"""Pipeline parallelism: the loss curve of one process over 20 steps for every schedule and
layout, and one step's gradients of every parameter equal to the one-process gradients."""

import re

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
    sync_shared_embeddings,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining,
)
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig
from tests.core.parallel.test_tensor_parallel_model import _full_grad
from tests.helpers import (
    TINY_MODEL,
    assert_same_curves,
    one_process_curves,
    run_distributed,
    train_layouts,
)

RUN = TINY_MODEL + ["--num-layers", "4", "--train-iters", "20", "--hidden-dropout", "0",
                    "--attention-dropout", "0", "--micro-batch-size", "2",
                    "--global-batch-size", "8", "--lr-warmup-iters", "2"]
PLACEMENTS = {"pre": [], "peri": ["--normalization", "RMSNorm", "--swiglu",
                                  "--position-embedding-type", "rope"],
              "mix": ["--untie-embeddings-and-output-weights"]}
LAYOUTS = {
    2: {"PP=2": (["--pipeline-model-parallel-size", "2"], ("pre", "peri", "mix")),
        "PP=2 virtual": (["--pipeline-model-parallel-size", "2",
                          "--num-layers-per-virtual-pipeline-stage", "1"], ("pre", "peri")),
        "PP=2 uneven": (["--pipeline-model-parallel-size", "2",
                         "--decoder-first-pipeline-num-layers", "1"], ("pre", "peri"))},
    4: {"PP=4": (["--pipeline-model-parallel-size", "4"], ("pre", "peri")),
        "TP=2xPP=2+SP": (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size",
                          "2", "--sequence-parallel"], ("pre", "peri")),
        "PP=2xDP=2": (["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"],
                      ("pre", "peri"))},
}


@pytest.fixture(scope="module")
def one_process():
    return one_process_curves(RUN, PLACEMENTS)


@pytest.mark.parametrize("world_size", [2, 4])
def test_loss_curve_matches_one_process(one_process, world_size):
    results = run_distributed(train_layouts, world_size, RUN, PLACEMENTS, LAYOUTS[world_size])
    assert_same_curves(results[-1], one_process, 20)


def _config(pp=1, tp=1, vp=None, placement="peri"):
    return TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                             norm_placement=placement, hidden_dropout=0.0,
                             attention_dropout=0.0, max_position_embeddings=16, init_seed=11,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             virtual_pipeline_model_parallel_size=vp,
                             sequence_parallel=tp > 1)


def _step(chunks, batches, schedule, **kwargs):
    """One global batch through ``schedule``; returns {global name: whole gradient}."""
    def forward_step(iterator, model):
        ids = next(iterator)
        out = model(ids, torch.arange(ids.shape[1]).expand_as(ids), labels=ids.roll(-1, 1))
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})
    schedule(forward_step_func=forward_step, data_iterator=[iter(batches) for _ in chunks],
             model=chunks, num_microbatches=len(batches), **kwargs)
    finalize_model_grads(chunks)
    return whole_gradients(chunks)


def whole_gradients(chunks):
    """{global parameter name: [whole gradient per copy]} of reduced DDP model chunks."""
    grads = {}
    for chunk in chunks:
        numbers = [layer.layer_number for layer in chunk.module.decoder.layers]
        for name, p in chunk.module.named_parameters():
            p.grad = p.main_grad
            name = re.sub(r"^decoder\.layers\.(\d+)\.",
                          lambda m: f"decoder.layers.{numbers[int(m.group(1))] - 1}.", name)
            if name == "output_layer.weight" and getattr(p, "shared_embedding", False):
                name = "embedding.word_embeddings.weight"  # the last stage's copy
            grads.setdefault(name, []).append(_full_grad(p))
    return grads


def _compare_gradients(pp, tp, vp):
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    batches = [torch.randint(0, 256, (2, 8)) for _ in range(4)]
    set_random_seed(3)
    whole = [DistributedDataParallel(DistributedDataParallelConfig(),
                                     GPTModel(_config(), 256))]
    expected = _step(whole, batches, forward_backward_no_pipelining)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    ps.set_virtual_pipeline_model_parallel_world_size(vp)
    chunks = []
    for k in range(vp or 1):
        ps.set_virtual_pipeline_model_parallel_rank(k if vp else None)
        chunks.append(DistributedDataParallel(DistributedDataParallelConfig(), GPTModel(
            _config(pp, tp, vp), 256, pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage())))
    ps.set_virtual_pipeline_model_parallel_rank(None)
    sync_shared_embeddings([c.module for c in chunks])
    got = _step(chunks, batches, forward_backward_pipelining,
                tensor_shape=(8 // tp, 2, 32), dtype=torch.float32)
    ps.destroy_model_parallel()
    problems = []
    for name, grads in got.items():
        e = expected[name][0]
        for g in grads:
            # fp32 sums split over tensor ranks and stages round differently: agreement to
            # 1e-5 relative, entries near zero to 1e-5 of the tensor's largest entry
            if not torch.allclose(g, e, rtol=1e-5, atol=1e-5 * float(e.abs().max())):
                problems.append((name, float((g - e).abs().max()), float(e.abs().max())))
    return problems, sorted(got), sorted(expected)


@pytest.mark.parametrize("world_size,pp,tp,vp", [(2, 2, 1, None), (2, 2, 1, 2),
                                                 (4, 4, 1, None), (4, 2, 2, None)])
def test_gradients_of_every_parameter(world_size, pp, tp, vp):
    results = run_distributed(_compare_gradients, world_size, pp, tp, vp)
    assert all(problems == [] for problems, _, _ in results), results
    covered = set(name for _, names, _ in results for name in names)
    assert covered == set(results[0][2])  # the stages together hold every parameter
