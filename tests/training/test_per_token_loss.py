"""--calculate-per-token-loss: the loss and the gradients are those of the global batch's
token mean (micro-batches weigh by their unmasked tokens), on one process and across tensor,
pipeline and data parallelism. --overlap-param-gather: the same losses as without it."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pretrain_gpt
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig
from megatron.training import global_vars
from megatron.training.utils import reduce_losses
from tests.helpers import (
    TINY_MODEL,
    assert_same_curves,
    lm_losses,
    run_distributed,
    run_pretrain,
    train_layouts,
    validation_losses,
)

ITERS = 10


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """NullTokenizer ids of documents ending in the end-of-document token (500): runs of
    1-3 token documents between runs of 20-60 token ones, so --eod-mask-loss masks from
    almost none to half of a micro-batch's tokens."""
    prefix = str(tmp_path_factory.mktemp("short") / "short_text_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix)
    for run in range(120):
        lengths = rng.integers(1, 4, 30) if run % 2 else rng.integers(20, 61, 3)
        for n in lengths:
            builder.add_item(np.append(rng.integers(0, 500, n - 1), 500))
            builder.end_document()
    builder.finalize()
    return prefix


def _run(prefix, tmp_path):
    return [a for a in TINY_MODEL if a != "--mock-data"] + [
        "--data-path", prefix, "--data-cache-path", str(tmp_path / "cache"),
        "--split", "98,1,1", "--eod-mask-loss", "--train-iters", str(ITERS),
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--lr-warmup-iters", "2", "--norm-placement", "peri"]


# --- the loss function, schedule and gradient normalization, by hand ---------------------
def _batches():
    torch.manual_seed(0)
    ids = [torch.randint(0, 128, (2, 8)) for _ in range(3)]
    masks = []
    for kept in (16, 3, 9):  # unmasked tokens per micro-batch
        mask = torch.zeros(16)
        mask[torch.randperm(16)[:kept]] = 1.0
        masks.append(mask.view(2, 8))
    return ids, masks


def _forward_step(batches):
    def forward_step(iterator, model):
        ids, mask = next(iterator)
        out = model(ids, torch.arange(8).expand_as(ids), labels=ids.roll(-1, 1))
        return out, lambda output: pretrain_gpt.loss_func(mask, output)
    return forward_step


def test_loss_and_gradients_are_the_global_token_mean():
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                               norm_placement="peri", hidden_dropout=0.0, attention_dropout=0.0,
                               max_position_embeddings=8, init_seed=5)
    set_random_seed(3)
    model = GPTModel(config, 128)
    reference = copy.deepcopy(model)
    ids, masks = _batches()
    saved = global_vars._ARGS
    global_vars.set_args(SimpleNamespace(calculate_per_token_loss=True))
    try:
        ddp = DistributedDataParallel(DistributedDataParallelConfig(
            calculate_per_token_loss=True), model)
        ddp.zero_grad_buffer()
        reported = forward_backward_no_pipelining(
            forward_step_func=_forward_step(ids), data_iterator=iter(zip(ids, masks)),
            model=ddp, num_microbatches=3, calculate_per_token_loss=True,
            finalize_model_grads_func=finalize_model_grads)
    finally:
        global_vars.set_args(saved)
    loss = float(reduce_losses(reported)["lm loss"])

    # one big batch of the three micro-batches, its loss the mean over all unmasked tokens
    big_ids, big_mask = torch.cat(ids), torch.cat(masks)
    losses = reference(big_ids, torch.arange(8).expand_as(big_ids), labels=big_ids.roll(-1, 1))
    token_mean = (losses * big_mask).sum() / big_mask.sum()
    token_mean.backward()
    per_batch = [float((x * m).sum() / m.sum()) for x, m in zip(losses.detach().split(2), masks)]
    # fp32 sums in another order: agreement to a few ulps of the loss
    assert loss == pytest.approx(float(token_mean.detach()), rel=1e-6)
    assert abs(loss - sum(per_batch) / 3) > 1e-3  # the micro-batch mean would be another loss
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        # the same sums accumulated per micro-batch: 1e-5 relative to the tensor's scale
        assert torch.allclose(p.main_grad, q.grad, rtol=1e-5,
                              atol=1e-6 * float(q.grad.abs().max())), name


# --- whole runs: one process, one big micro-batch, and TP/PP/DP layouts --------------------
@pytest.fixture(scope="module")
def one_process(short_documents, tmp_path_factory):
    """{name: {iteration: lm loss}} of one-process runs over four micro-batches (per-token
    and micro-batch mean) and over one micro-batch of the whole global batch."""
    run = _run(short_documents, tmp_path_factory.mktemp("one"))
    curves = {}
    for name, extra in (("per-token", ["--calculate-per-token-loss"]),
                        ("one micro-batch", ["--micro-batch-size", "8"]),
                        ("micro-batch mean", [])):
        code, lines = run_pretrain(run + extra)
        assert code == 0, lines[-3:]
        curves[name] = {i: float(v) for i, v in lm_losses(lines).items()}
    return curves


def test_one_process_equals_one_micro_batch_of_the_global_batch(one_process):
    """With one micro-batch per global batch, Megatron's default loss is already the token
    mean of the global batch: the per-token run over four micro-batches follows it, the
    default (per-micro-batch mean) run does not."""
    curves = one_process
    assert sorted(curves["per-token"]) == list(range(1, ITERS + 1))
    for i, value in curves["per-token"].items():
        # fp32 sums split over micro-batches round differently; 10 Adam steps grow it to ~1e-6
        assert value == pytest.approx(curves["one micro-batch"][i], rel=1e-4), i
    mean, per_token = curves["micro-batch mean"], curves["per-token"]
    assert max(abs(mean[i] / per_token[i] - 1) for i in per_token) > 1e-3


LAYOUTS = {
    2: {"DP=2": ([], ("peri",))},
    4: {"TP=2xPP=2+SP": (["--tensor-model-parallel-size", "2",
                          "--pipeline-model-parallel-size", "2", "--sequence-parallel"],
                         ("peri",)),
        "PP=2xDP=2 distributed optimizer, overlapped gathers": (
            ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
             "--overlap-param-gather", "--ddp-bucket-size", "5000"], ("peri",))},
}


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layouts_match_one_process(short_documents, one_process, tmp_path,
                                            world_size):
    run = _run(short_documents, tmp_path) + ["--calculate-per-token-loss"]
    results = run_distributed(train_layouts, world_size, run, {"peri": []},
                              LAYOUTS[world_size])
    assert_same_curves(results[-1], {"peri": one_process["per-token"]}, ITERS)


# --- --overlap-param-gather ---------------------------------------------------------------
def _printed(runs):
    out = []
    for argv in runs:
        code, lines = run_pretrain(argv)
        out.append((code, lm_losses(lines), validation_losses(lines)))
    return out


def test_overlap_param_gather_gives_the_same_losses_and_resumes(tmp_path):
    """The gather only moves bytes: every printed digit is the same, and a checkpoint saved
    while a gather could be in flight resumes the curve exactly."""
    run = TINY_MODEL + ["--train-iters", str(ITERS), "--hidden-dropout", "0",
                        "--attention-dropout", "0", "--micro-batch-size", "2",
                        "--use-distributed-optimizer", "--overlap-grad-reduce",
                        "--ddp-bucket-size", "5000", "--norm-placement", "pre",
                        "--eval-interval", "5", "--eval-iters", "1"]
    overlap = run + ["--overlap-param-gather"]
    ckpt = str(tmp_path / "ckpt")
    (c0, plain, plain_valid), (c1, first, first_valid), (c2, resumed, resumed_valid) = \
        run_distributed(_printed, 2, [run, overlap + ["--save", ckpt, "--exit-interval", "5"],
                                      overlap + ["--load", ckpt]])[-1]
    assert (c0, c1, c2) == (0, 0, 0)
    assert len(plain) == ITERS and {**first, **resumed} == plain
    assert first_valid + resumed_valid == plain_valid


def _gather_in_flight():
    """Each rank fills its slices with rank + 1 and starts the gathers: all buckets are in
    flight until the forward pre-hooks of the modules using them wait for them."""
    import torch.distributed as dist

    from megatron.core import parallel_state as ps
    dist.init_process_group("gloo")
    ps.initialize_model_parallel()
    set_random_seed(1)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                               norm_placement="pre", max_position_embeddings=8, init_seed=1)
    model = DistributedDataParallel(DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_param_gather=True, bucket_size=2000),
        GPTModel(config, 64))
    for bucket in model.buckets:
        lo, hi = model.shard_range(bucket)
        model.param_buffer[lo:hi] = float(ps.get_data_parallel_rank() + 1)
    model.start_param_sync()
    in_flight = sum(bucket.param_gather is not None for bucket in model.buckets)
    ids = torch.randint(0, 64, (2, 8))
    model(ids, torch.arange(8).expand_as(ids))
    left = sum(bucket.param_gather is not None for bucket in model.buckets)
    gathered = all(torch.equal(model.param_buffer[b.start:b.end],
                               torch.arange(1.0, 3.0).repeat_interleave((b.end - b.start) // 2))
                   for b in model.buckets)
    ps.destroy_model_parallel()
    return len(model.buckets), in_flight, left, gathered


def test_gathers_are_waited_for_by_the_forward_pre_hooks():
    for buckets, in_flight, left, gathered in run_distributed(_gather_in_flight, 2):
        assert buckets > 2 and in_flight == buckets and left == 0 and gathered


def test_overlap_param_gather_needs_the_distributed_optimizer():
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "1", "--overlap-param-gather"])
    assert code == 2
    assert any("--overlap-param-gather needs --use-distributed-optimizer" in line
               for line in lines)
