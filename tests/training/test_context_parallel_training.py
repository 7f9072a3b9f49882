"""Context parallelism trains what one process trains.

- One global batch's loss and every parameter's gradient equal one process's at CP=2, CP=4,
  CP=2 x TP=2 with sequence parallelism and CP=2 x PP=2, for Pre-LN and Peri-LN, with and
  without document masks (pretrain_gpt's forward step and loss, the real schedules and
  gradient reduction).
- pretrain_gpt.py's loss curve equals one process's with the distributed optimizer, full and
  selective recomputation, per-token loss, document masks and ring or all-gather attention,
  and so do the layer statistics.
- Attention dropout drops the same pairs at every context and tensor split.
- A checkpoint saved at CP=2 resumes at CP=1 and at CP=4 onto the uninterrupted curve.
"""

import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import pretrain_gpt
from megatron.core import parallel_state as ps
from megatron.core.datasets.gpt_dataset import document_ids
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
from megatron.training import global_vars
from tests.helpers import TINY_MODEL, lm_losses, run_distributed, run_pretrain
from tests.training import test_layer_stats as single
from tests.training.test_layer_stats_parallel import assert_close
from tests.training.test_pipeline_training import whole_gradients

VOCAB, SEQ, EOD = 256, 32, 0
PLACEMENTS = {"pre": dict(normalization="LayerNorm"),
              "peri": dict(normalization="RMSNorm", gated_linear_unit=True,
                           add_bias_linear=False, position_embedding_type="rope",
                           embedding_norm=True, num_query_groups=2)}


def _config(placement, tp=1, pp=1, cp=1, comm="p2p"):
    return TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4,
                             norm_placement=placement, hidden_dropout=0.0,
                             attention_dropout=0.0, max_position_embeddings=SEQ, init_seed=5,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             sequence_parallel=tp > 1, context_parallel_size=cp,
                             cp_comm_type=comm, **PLACEMENTS[placement])


def _batches(documents: bool):
    """Four micro-batches of 2 sequences; with ``documents`` end-of-document tokens every few
    positions and their document ids (pretrain_gpt's batch under context parallelism)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        text = torch.randint(1, VOCAB, (2, SEQ + 1), generator=g)
        if documents:
            text[torch.rand(text.shape, generator=g) < 0.15] = EOD
        tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
        batch = {"tokens": tokens, "labels": labels,
                 "loss_mask": (torch.rand(tokens.shape, generator=g) > 0.1).float(),
                 "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous()}
        if documents:
            batch["document_ids"] = document_ids(tokens, EOD)
        out.append(batch)
    return out


def _step(chunks, batches, schedule, **kwargs):
    """One global batch through pretrain_gpt's forward step: (loss, {name: whole gradient})."""
    reported = schedule(forward_step_func=pretrain_gpt.forward_step,
                        data_iterator=[iter(batches) for _ in chunks], model=chunks,
                        num_microbatches=len(batches), **kwargs)
    finalize_model_grads(chunks)
    loss = float(torch.stack([r["lm loss"] for r in reported]).mean()) if reported else None
    return loss, {name: grads[0] for name, grads in whole_gradients(chunks).items()}


def _compare_gradients(layouts):
    """In each rank: every (tp, pp, cp, comm) layout x placement x mask against one process;
    returns the mismatches."""
    dist.init_process_group("gloo")
    global_vars.set_args(SimpleNamespace(calculate_per_token_loss=False))
    problems = []
    for tp, pp, cp, comm in layouts:
        for placement in PLACEMENTS:
            for documents in (False, True):
                batches = _batches(documents)
                where = (f"tp={tp} pp={pp} cp={cp} {comm}", placement,
                         "documents" if documents else "causal")
                set_random_seed(3)
                whole = [DistributedDataParallel(DistributedDataParallelConfig(),
                                                 GPTModel(_config(placement), VOCAB))]
                ref_loss, expected = _step(whole, batches, forward_backward_no_pipelining)
                ps.initialize_model_parallel(tp, pp, context_parallel_size=cp)
                set_random_seed(3)
                chunks = [DistributedDataParallel(DistributedDataParallelConfig(), GPTModel(
                    _config(placement, tp, pp, cp, comm), VOCAB,
                    pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage()))]
                sync_shared_embeddings([c.module for c in chunks])
                if pp > 1:
                    loss, got = _step(chunks, batches, forward_backward_pipelining,
                                      tensor_shape=(SEQ // cp // tp, 2, 32),
                                      dtype=torch.float32)
                else:
                    loss, got = _step(chunks, batches, forward_backward_no_pipelining)
                ps.destroy_model_parallel()
                # fp32 sums split over ranks round differently: the loss to 1e-5 relative,
                # gradients to 1e-4 (entries near zero: 1e-5 of the tensor's largest entry)
                if loss is not None and abs(loss - ref_loss) > 1e-5 * abs(ref_loss):
                    problems.append(where + ("loss", loss, ref_loss))
                for name, g in got.items():
                    e = expected[name]
                    if not torch.allclose(g, e, rtol=1e-4, atol=1e-5 * float(e.abs().max())):
                        problems.append(where + (name, float((g - e).abs().max()),
                                                 float(e.abs().max())))
                if not got.keys() <= expected.keys():
                    problems.append(where + ("names", sorted(got)))
    dist.destroy_process_group()
    return problems


@pytest.mark.parametrize("world_size,layouts", [
    (2, [(1, 1, 2, "p2p"), (1, 1, 2, "all_gather")]),
    (4, [(1, 1, 4, "p2p"), (2, 1, 2, "p2p"), (1, 2, 2, "p2p")]),
], ids=["CP=2", "CP=4,CP=2xTP=2+SP,CP=2xPP=2"])
def test_loss_and_gradients_match_one_process(world_size, layouts):
    assert run_distributed(_compare_gradients, world_size, layouts) == [[]] * world_size


# --- pretrain_gpt.py end to end ------------------------------------------------------------
RUN = TINY_MODEL + ["--num-layers", "4", "--train-iters", "8", "--hidden-dropout", "0",
                    "--attention-dropout", "0", "--lr-warmup-iters", "2",
                    "--micro-batch-size", "2", "--global-batch-size", "8"]
RUN_PLACEMENTS = {"pre": [], "peri": ["--normalization", "RMSNorm", "--swiglu",
                                      "--position-embedding-type", "rope",
                                      "--group-query-attention", "--num-query-groups", "2"]}
DOCUMENTS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
STATS = ["--log-layer-stats", "--layer-stats-interval", "4"]
TRAIN_LAYOUTS = {
    2: {"CP=2 documents": (["--context-parallel-size", "2"] + DOCUMENTS, "peri"),
        "CP=2 all_gather, distributed optimizer, selective recompute": (
            ["--context-parallel-size", "2", "--cp-comm-type", "allgather",
             "--use-distributed-optimizer", "--recompute-granularity", "selective",
             "--recompute-modules", "core_attn", "layernorm"], "pre"),
        "CP=2 full recompute, per-token loss": (
            ["--context-parallel-size", "2", "--recompute-granularity", "full",
             "--recompute-method", "uniform", "--recompute-num-layers", "2",
             "--calculate-per-token-loss"], "peri")},
    4: {"CP=2xDP=2 distributed optimizer, documents": (
            ["--context-parallel-size", "2", "--use-distributed-optimizer",
             "--overlap-grad-reduce"] + DOCUMENTS, "peri"),
        "CP=2xTP=2+SP": (["--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                          "--sequence-parallel"], "pre"),
        "CP=2xPP=2 documents": (["--context-parallel-size", "2",
                                 "--pipeline-model-parallel-size", "2"] + DOCUMENTS, "peri")},
}


def _flags(flags, placement, stats_path):
    return RUN + RUN_PLACEMENTS[placement] + ["--norm-placement", placement] + flags + \
        STATS + ["--layer-stats-file", stats_path]


def _reference_flags(flags):
    """The one-process run of a layout: its data and loss options, none of its layout."""
    keep = DOCUMENTS + ["--calculate-per-token-loss"]
    return [f for f in flags if f in keep]


def _file_name(layout: str) -> str:
    return re.sub(r"\W+", "_", layout) + ".jsonl"


def _train_layouts(base, layouts):
    out = {}
    for name, (flags, placement) in layouts.items():
        path = os.path.join(base, _file_name(name))
        code, lines = run_pretrain(_flags(flags, placement, path))
        steps = None
        if int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
            steps = [r for r in single.read(path) if r["type"] == "layer_stats"]
        out[name] = (code, lm_losses(lines), steps, lines[-3:])
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_pretrain_curves_and_layer_stats_match_one_process(world_size, tmp_path):
    layouts = TRAIN_LAYOUTS[world_size]
    expected = {}
    for name, (flags, placement) in layouts.items():
        path = str(tmp_path / ("one-" + _file_name(name)))
        code, lines = run_pretrain(_flags(_reference_flags(flags), placement, path))
        assert code == 0, lines[-3:]
        expected[name] = (lm_losses(lines),
                          [r for r in single.read(path) if r["type"] == "layer_stats"])
    results = run_distributed(_train_layouts, world_size, str(tmp_path), layouts)[-1]
    for name, (code, losses, steps, tail) in results.items():
        assert code == 0, (name, tail)
        ref_losses, ref_steps = expected[name]
        assert sorted(losses) == list(range(1, 9)), name
        for i, value in losses.items():
            # fp32 sums split over ranks; 8 Adam steps let their ulps grow to ~1e-6
            assert float(value) == pytest.approx(float(ref_losses[i]), rel=1e-4), (name, i)
        assert [s["iteration"] for s in steps] == [4, 8]
        assert_close(steps, ref_steps, (name,))


# --- checkpoints do not depend on the context-parallel size ---------------------------------
CKPT_RUN = RUN + RUN_PLACEMENTS["peri"] + ["--norm-placement", "peri", "--disable-bias-linear",
                                           "--use-distributed-optimizer",
                                           "--max-position-embeddings", "64"] + DOCUMENTS


def _save_at_cp2(ckpt):
    code, lines = run_pretrain(CKPT_RUN + ["--context-parallel-size", "2", "--save", ckpt,
                                           "--save-interval", "4", "--exit-interval", "4"])
    return code, lm_losses(lines)


def _resume(ckpt, cp):
    code, lines = run_pretrain(CKPT_RUN + ["--context-parallel-size", str(cp), "--load", ckpt])
    return code, lm_losses(lines), lines[-3:]


def test_checkpoint_saved_at_cp2_resumes_at_cp1_and_cp4(tmp_path):
    code, lines = run_pretrain(CKPT_RUN)
    assert code == 0, lines[-3:]
    uninterrupted = lm_losses(lines)
    ckpt = str(tmp_path / "ckpt")
    code, first = run_distributed(_save_at_cp2, 2, ckpt)[-1]
    assert code == 0 and sorted(first) == [1, 2, 3, 4]
    code, resumed_1, tail = _resume(ckpt, 1)
    assert code == 0, tail
    code, resumed_4, tail = run_distributed(_resume, 4, ckpt, 4)[-1]
    assert code == 0, tail
    for losses in (first, resumed_1, resumed_4):
        for i, value in losses.items():  # the curve goes on as if never interrupted
            assert float(value) == pytest.approx(float(uninterrupted[i]), rel=1e-4), i
    assert sorted(resumed_1) == sorted(resumed_4) == [5, 6, 7, 8]
    # the tools read it as a one-process model: exported to Hugging Face, its logits are ours
    # (weights redrawn so that the logits are large enough to compare)
    from tests.tools.test_convert import check_export, run_convert, spread_weights
    spread_weights(ckpt)
    out = str(tmp_path / "hf")
    code, text = run_convert("--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
                             "--save-dir", out)
    assert code == 0, text
    check_export(ckpt, out, "Glm4ForCausalLM", remote=False)


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size, extra, words", [
    (2, ["--seq-length", "30"], "--seq-length 30 is not divisible by 2 x "
                                "--context-parallel-size 2"),
    (4, ["--seq-length", "36", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
     "x --tensor-model-parallel-size 2 (sequence parallelism"),
    (2, ["--cp-comm-type", "a2a"], "--cp-comm-type 'a2a' is not available here"),
    (2, ["--cp-comm-type", "p2p", "p2p"], "one per layer"),
    (3, [], "world size 3 is not divisible by"),
])
def test_bad_layouts_are_one_sentence(world_size, extra, words):
    from megatron.training.arguments import ArgumentError, parse_args, validate_args
    args = parse_args(RUN + ["--context-parallel-size", "2"] + extra)
    with pytest.raises(ArgumentError) as info:
        validate_args(args, world_size=world_size)
    text = str(info.value)
    assert words in text and "\n" not in text and text.endswith(".")
    assert text.count(". ") == 0 and text.count("; ") <= 1


def _dense_masks_at_cp2():
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    pretrain_gpt.GPTDatasetConfig = lambda **kw: GPTDatasetConfig(**{**kw, "document_ids": False})
    return run_pretrain(RUN + DOCUMENTS + ["--context-parallel-size", "2"])


def test_a_dense_mask_is_refused_before_training():
    """A data provider that gives Megatron's dense [1, s, s] mask at CP > 1."""
    code, lines = run_distributed(_dense_masks_at_cp2, 2)[0]
    errors = [line for line in lines if "error:" in line]
    assert code == 2 and len(errors) == 1, lines[-5:]
    assert "dense [1, s, s] attention mask, which context parallelism cannot split" in errors[0]
    assert not any("iteration" in line for line in lines)


# --- attention dropout is the same at every split ------------------------------------------
DROPOUT_RUN = RUN + RUN_PLACEMENTS["peri"] + ["--norm-placement", "peri",
                                              "--attention-dropout", "0.2"] + DOCUMENTS


def _dropout_curves(layouts):
    return {name: run_pretrain(DROPOUT_RUN + flags) for name, flags in layouts.items()}


def test_attention_dropout_curves_agree_across_context_and_tensor_splits():
    """Attention dropout under context parallelism drops pairs by a hash of the pair, so CP=2
    (ring or all-gather), CP=4 and CP=2 x TP=2 train the same curve."""
    two = run_distributed(_dropout_curves, 2, {
        "CP=2": ["--context-parallel-size", "2"],
        "CP=2 all_gather": ["--context-parallel-size", "2", "--cp-comm-type", "all_gather"]})
    four = run_distributed(_dropout_curves, 4, {
        "CP=4": ["--context-parallel-size", "4"],
        "CP=2xTP=2+SP": ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                         "--sequence-parallel"]})
    curves = {}
    for name, (code, lines) in {**two[-1], **four[-1]}.items():
        assert code == 0, (name, lines[-3:])
        curves[name] = {i: float(v) for i, v in lm_losses(lines).items()}
    reference = curves.pop("CP=2")
    assert sorted(reference) == list(range(1, 9))
    for name, curve in curves.items():
        for i, value in curve.items():
            assert value == pytest.approx(reference[i], rel=1e-4), (name, i)
    code, lines = run_pretrain(DROPOUT_RUN[:-len(DOCUMENTS)] + DOCUMENTS +
                               ["--attention-dropout", "0"])
    undropped = {i: float(v) for i, v in lm_losses(lines).items()}
    assert undropped[8] != pytest.approx(reference[8], rel=1e-4)  # dropout did something
