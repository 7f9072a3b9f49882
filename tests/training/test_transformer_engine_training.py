"""pretrain_gpt.py with --transformer-impl transformer_engine: flags, checkpoints that load
into either implementation, layer statistics; run on CPU with the TransformerEngine stand-in
of tests/fake_transformer_engine.py (the real TE needs CUDA; tests/gpu runs it)."""

import json

import pytest

from megatron.core.extensions import transformer_engine as te_ext
from tests import fake_transformer_engine as fake_te
from tests.helpers import TINY_MODEL, lm_losses, run_pretrain

TE = ["--transformer-impl", "transformer_engine"]
RUN = TINY_MODEL + ["--norm-placement", "peri", "--normalization", "RMSNorm", "--swiglu",
                    "--position-embedding-type", "rope", "--train-iters", "6"]


@pytest.fixture
def fake_te_here(monkeypatch):
    """The stand-in installed, and its CUDA requirement waived (the fake runs on CPU)."""
    monkeypatch.setattr(te_ext, "availability_problem", lambda fp8: None)
    with fake_te.installed():
        yield


def test_te_and_local_checkpoints_load_into_each_other(fake_te_here, tmp_path):
    """A run stopped at iteration 3 and resumed with the other implementation prints the
    losses of one that never stopped (same weights, optimizer state, RNG, data position).
    The implementations compute the same model bit for bit (test_transformer_engine.py), but
    hold the fused norms' weights in another parameter order, so the gradient norm is summed
    in another order: the printed losses (7 digits) may differ in the last one."""
    def same(a, b):
        return a.keys() == b.keys() and all(
            float(a[i]) == pytest.approx(float(b[i]), rel=1e-6) for i in a)
    code, lines = run_pretrain(RUN + TE)
    assert code == 0, lines[-3:]
    straight = lm_losses(lines)
    code, lines = run_pretrain(RUN)
    assert code == 0, lines[-3:]
    assert same(lm_losses(lines), straight)
    for first, then in ((TE, []), ([], TE), (TE, TE)):
        ckpt = str(tmp_path / f"ckpt{len(first)}{len(then)}")
        code, lines = run_pretrain(RUN + first + ["--save", ckpt, "--exit-interval", "3"])
        assert code == 0, lines[-3:]
        code, lines = run_pretrain(RUN + then + ["--load", ckpt])
        assert code == 0, lines[-3:]
        resumed = lm_losses(lines)
        assert sorted(resumed) == [4, 5, 6]
        assert same(resumed, {i: straight[i] for i in resumed}), (first, then, resumed)
        afresh = any("TransformerEngine's FP8 scales start afresh" in x for x in lines)
        assert afresh == (then == TE and first != TE)  # TE's metadata kept from TE to TE


def test_te_checkpoint_holds_local_names(fake_te_here, tmp_path):
    import torch
    ckpt = tmp_path / "ckpt"
    code, lines = run_pretrain(RUN + TE + ["--save", str(ckpt), "--train-iters", "1"])
    assert code == 0, lines[-3:]
    state = torch.load(ckpt / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=True)
    names = set(state["model"])
    assert "decoder.layers.0.input_layernorm.weight" in names
    assert not any("layer_norm_weight" in n or "_extra_state" in n for n in names)
    assert set(state["optimizer"]["param_state"]["model"]) == names
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in \
        state["te_extra_state"]["model"]


def test_layer_statistics_are_the_same_with_te(fake_te_here, tmp_path):
    """The fused input norms' gains are found inside TE's LayerNormLinear."""
    records = {}
    for name, impl in (("local", []), ("te", TE)):
        path = tmp_path / f"{name}.jsonl"
        code, lines = run_pretrain(RUN + impl + [
            "--train-iters", "2", "--log-layer-stats", "--layer-stats-interval", "1",
            "--layer-stats-file", str(path)])
        assert code == 0, lines[-3:]
        records[name] = [json.loads(x)["layers"] for x in open(path) if '"layer_stats"' in x]
    assert records["te"] == records["local"]
    assert set(records["te"][0][1]["norms"]) >= {"input_layernorm", "pre_mlp_layernorm",
                                                 "post_self_attn_layernorm"}


def test_te_fp8_flags_reach_the_recipe(fake_te_here):
    fake_te.ENTERED.clear()
    code, lines = run_pretrain(RUN + TE + ["--train-iters", "1", "--fp8-format", "hybrid",
                                           "--fp8-recipe", "delayed",
                                           "--fp8-amax-history-len", "8"])
    assert code == 0, lines[-3:]
    recipe, group = fake_te.ENTERED[0]
    assert (recipe.fp8_format, recipe.amax_history_len) == (fake_te.Format.HYBRID, 8)


@pytest.mark.parametrize("flags, expected", [
    (TE, "needs TransformerEngine, which cannot be imported here"),
    (["--fp8-param-gather"], "--fp8-param-gather needs --fp8-format"),
    (["--fp8-format", "hybrid", "--fp8-param-gather"],
     "--fp8-param-gather needs TransformerEngine's FP8 weights"),
])
def test_te_bad_input_one_sentence(flags, expected):
    code, lines = run_pretrain(RUN + flags)
    assert code == 2
    assert expected in lines[-1], lines[-3:]


def test_te_without_cuda_names_what_is_missing():
    with fake_te.installed():  # importable, but this machine has no GPU
        code, lines = run_pretrain(RUN + TE)
    assert code == 2
    assert "needs a CUDA GPU and none is visible" in lines[-1], lines[-3:]


def test_te_fp8_shapes_must_be_multiples_of_16(fake_te_here):
    code, lines = run_pretrain(RUN + TE + ["--fp8-format", "hybrid", "--hidden-size", "72",
                                           "--num-attention-heads", "4"])
    assert code == 2 and "multiples of 16" in lines[-1], lines[-3:]


PARALLEL = RUN + ["--train-iters", "8", "--hidden-dropout", "0", "--attention-dropout", "0",
                  "--micro-batch-size", "2"]
LAYOUTS = {"TP=2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
           "PP=2": ["--pipeline-model-parallel-size", "2"],
           "DP=2, distributed optimizer": ["--use-distributed-optimizer"]}


def _te_layouts(layouts):
    """{layout: lm losses} of TE-stand-in runs in this spawned rank."""
    te_ext.availability_problem = lambda fp8: None  # the stand-in runs on CPU
    out = {}
    with fake_te.installed():
        for name, flags in layouts.items():
            code, lines = run_pretrain(PARALLEL + TE + flags)
            assert code == 0, (name, lines[-3:])
            out[name] = {i: float(v) for i, v in lm_losses(lines).items()}
    return out


def test_te_layers_under_tensor_pipeline_and_data_parallelism_match_one_local_process():
    """TE's layers on our groups (tensor + sequence, pipeline, data with the distributed
    optimizer's gradient buffers) print the loss curve of the local layers in one process.
    fp32 sums split across ranks: 1e-5 relative over 8 steps, as the local layouts' tests."""
    from tests.helpers import run_distributed
    code, lines = run_pretrain(PARALLEL)
    assert code == 0, lines[-3:]
    one = {i: float(v) for i, v in lm_losses(lines).items()}
    got = run_distributed(_te_layouts, 2, LAYOUTS)[-1]  # the last rank prints the losses
    for name, losses in got.items():
        assert sorted(losses) == sorted(one), name
        for i in one:
            assert losses[i] == pytest.approx(one[i], rel=1e-5), (name, i, losses[i], one[i])
