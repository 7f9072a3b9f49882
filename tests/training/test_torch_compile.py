"""--torch-compile: each transformer layer compiled, alone and with tensor + sequence and
pipeline parallelism and recomputation; the loss curve stays the eager one's within the
compiler's rounding; where compilation fails, one warning and the eager layers."""

import warnings

import pytest
import torch
import torch._dynamo.exc

from tests.helpers import TINY_MODEL, lm_losses, run_distributed, run_pretrain

RUN = TINY_MODEL + ["--norm-placement", "peri", "--normalization", "RMSNorm", "--swiglu",
                    "--position-embedding-type", "rope", "--train-iters", "4",
                    "--micro-batch-size", "2", "--hidden-dropout", "0",
                    "--attention-dropout", "0"]
# Inductor fuses the norms, RoPE, SwiGLU and residual adds and so rounds differently from
# eager; over 4 fp32 steps the curves agree to about 1e-6 relative.
TOLERANCE = 1e-5
VARIANTS = {"compiled": ["--torch-compile"],
            "compiled, full recomputation": ["--torch-compile", "--recompute-granularity",
                                             "full", "--recompute-method", "uniform",
                                             "--recompute-num-layers", "1"],
            "compiled, selective recomputation": ["--torch-compile", "--recompute-activations",
                                                  "--recompute-modules", "core_attn", "mlp"]}
LAYOUTS = {"TP=2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
           "PP=2": ["--pipeline-model-parallel-size", "2"]}


def _curves(runs):
    out = {}
    for layout, name in runs:
        code, lines = run_pretrain(RUN + LAYOUTS[layout] + VARIANTS[name])
        assert code == 0, (layout, name, lines[-3:])
        assert not any("running them eagerly" in x for x in lines), (layout, name)
        out[(layout, name)] = {i: float(v) for i, v in lm_losses(lines).items()}
    return out


def test_compiled_layers_follow_the_eager_curve():
    code, lines = run_pretrain(RUN)
    assert code == 0, lines[-3:]
    eager = {i: float(v) for i, v in lm_losses(lines).items()}
    code, lines = run_pretrain(RUN + VARIANTS["compiled"])
    assert code == 0, lines[-3:]
    assert sum("torch.compile: the first iteration" in x for x in lines) == 1
    compiled = {i: float(v) for i, v in lm_losses(lines).items()}
    assert compiled.keys() == eager.keys()
    for i in eager:
        assert compiled[i] == pytest.approx(eager[i], rel=TOLERANCE), i


def test_compiled_under_tensor_and_pipeline_parallelism_and_recomputation():
    code, lines = run_pretrain(RUN)
    eager = {i: float(v) for i, v in lm_losses(lines).items()}
    runs = [("TP=2+SP", "compiled, selective recomputation"),
            ("PP=2", "compiled, full recomputation")]
    curves = run_distributed(_curves, 2, runs)[-1]
    assert set(curves) == set(runs)
    for (layout, name), curve in curves.items():
        assert curve.keys() == eager.keys(), (layout, name)
        for i in eager:
            assert curve[i] == pytest.approx(eager[i], rel=TOLERANCE), (layout, name, i)


def test_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(module, *args, **kwargs):
        def call(*a, **k):
            raise torch._dynamo.exc.TorchDynamoException("no C compiler found (simulated)")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    code, eager_lines = run_pretrain(RUN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, lines = run_pretrain(RUN + ["--torch-compile"])
    assert code == 0, lines[-3:]
    messages = sorted(str(w.message) for w in caught if "torch.compile" in str(w.message))
    assert len(messages) == 1, messages  # the layers (the output layer and loss stay eager)
    assert "the transformer layers" in messages[0]
    assert all("no C compiler found" in m and "running them eagerly" in m for m in messages)
    assert lm_losses(lines) == lm_losses(eager_lines)  # the eager layers exactly


def test_norm_recomputation_and_compile_refused():
    code, lines = run_pretrain(RUN + ["--torch-compile", "--recompute-activations",
                                      "--recompute-modules", "layernorm"])
    assert code == 2 and "cannot be combined with --torch-compile" in lines[-1], lines[-3:]
