"""Every TransformerEngine class and function we call exists in TransformerEngine 2.20.2 and
accepts every keyword we pass, checked against its source (the pure-Python
``transformer-engine`` wheel holds TE's PyTorch frontend; importing it needs CUDA libraries,
so the source is read, not run).

The calls are those our code makes while building and running models of every placement with
the stand-in of tests/fake_transformer_engine.py, which records each call. The wheel is
fetched once into .te-source/ (as the megatron-core environment is cached); the test skips
with the reason when it cannot be fetched."""

import os
import subprocess
import sys
import zipfile

import pytest
import torch

from megatron.core.fp8 import FP8Recipe
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig
from tests import fake_transformer_engine as fake_te
from tests.core.extensions.te_source import TESource
from tests.helpers import REPO

TE_VERSION = "2.20.2"
PYTORCH, RECIPE = "transformer_engine.pytorch", "transformer_engine.common.recipe"
# where each recorded call lives in TE, and the arguments we pass by position
API = {
    "Linear": (f"{PYTORCH}.Linear", "__init__", ["in_features", "out_features"]),
    "LayerNormLinear": (f"{PYTORCH}.LayerNormLinear", "__init__",
                        ["in_features", "out_features"]),
    "LayerNorm": (f"{PYTORCH}.LayerNorm", "__init__", ["normalized_shape"]),
    "RMSNorm": (f"{PYTORCH}.RMSNorm", "__init__", ["normalized_shape"]),
    "DotProductAttention": (f"{PYTORCH}.DotProductAttention", "__init__",
                            ["num_attention_heads", "kv_channels"]),
    "Linear.forward": (f"{PYTORCH}.Linear", "forward", ["inp"]),
    "LayerNormLinear.forward": (f"{PYTORCH}.LayerNormLinear", "forward", ["inp"]),
    "DotProductAttention.forward": (f"{PYTORCH}.DotProductAttention", "forward",
                                    ["query_layer", "key_layer", "value_layer"]),
    "autocast": (f"{PYTORCH}.autocast", "__init__", []),
    "checkpoint": (f"{PYTORCH}.checkpoint", None, ["function"]),
    "quantized_model_init": (f"{PYTORCH}.quantized_model_init", None, []),
    "DelayedScaling": (f"{RECIPE}.DelayedScaling", "__init__", []),
    "Float8CurrentScaling": (f"{RECIPE}.Float8CurrentScaling", "__init__", []),
}


@pytest.fixture(scope="session")
def te_source():
    root = os.path.join(REPO, ".te-source", TE_VERSION)
    marker = os.path.join(root, "transformer_engine", "pytorch", "__init__.py")
    if not os.path.exists(marker):
        wheels = os.path.join(REPO, ".te-source", "wheels")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels,
             f"transformer-engine=={TE_VERSION}"], capture_output=True, text=True, timeout=600)
        found = [f for f in os.listdir(wheels) if f.endswith(".whl") and TE_VERSION in f] \
            if os.path.isdir(wheels) else []
        if result.returncode != 0 or not found:
            pytest.skip(f"transformer-engine {TE_VERSION} could not be fetched: "
                        f"{result.stderr.strip().splitlines()[-1:]}")
        with zipfile.ZipFile(os.path.join(wheels, found[0])) as z:
            z.extractall(root)
    return TESource(root)


def _record_our_calls():
    """Build and run, under the stand-in, models that make every kind of call we make."""
    fake_te.CALLS.clear()
    variants = [dict(norm_placement=p, normalization=n, qk_layernorm=qk,
                     layernorm_zero_centered_gamma=zc)
                for p in ("pre", "post", "peri", "mix") for n, qk, zc in
                (("LayerNorm", False, False), ("RMSNorm", True, True))]
    variants += [dict(norm_placement="peri", fp8=FP8Recipe(recipe=r), fp8_param_gather=True)
                 for r in ("delayed", "tensorwise")]
    variants += [dict(norm_placement="peri", recompute_granularity="full",
                      recompute_method="uniform", recompute_num_layers=1),
                 dict(norm_placement="pre", recompute_granularity="selective",
                      recompute_modules=["core_attn", "mlp"])]
    ids = torch.randint(0, 64, (2, 16))
    pos = torch.arange(16).expand_as(ids)
    mask = torch.ones(16, 16, dtype=torch.bool).triu(1).expand(2, 1, 16, 16)
    set_random_seed(1)
    with fake_te.installed():
        for v in variants:
            config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_query_groups=2, transformer_impl="transformer_engine",
                                       gated_linear_unit=True, **v)
            model = GPTModel(config, 64)
            model(ids, pos).sum().backward()
            model(ids, pos, attention_mask=mask)
    return sorted(set(fake_te.CALLS))


def test_every_te_call_matches_transformer_engine_source(te_source):
    calls = _record_our_calls()
    assert {api for api, _ in calls} == set(API), "a call the table above does not know"
    problems = []
    for api, keywords in calls:
        target, method, positional = API[api]
        try:
            sig = te_source.signature(target, method) if method else \
                te_source.signature(target)
        except LookupError as e:
            problems.append(f"{target}: not found in TransformerEngine {TE_VERSION} ({e})")
            continue
        if sig.params[:len(positional)] != positional:
            problems.append(f"{target}.{method}: positional arguments are "
                            f"{sig.params[:len(positional)]}, we pass {positional}")
        named = [k for k in keywords if k not in positional]
        problems += [f"{target}.{method or ''}: no keyword {k!r}" for k in named
                     if not sig.accepts(k)]
    assert not problems, "\n".join(problems)


def test_te_names_we_rely_on_exist(te_source):
    """Attributes we read from TE modules, parameter names checkpoints map, and the recipe's
    formats."""
    source = te_source.source_of(f"{PYTORCH}.LayerNormLinear")
    for name in ('"layer_norm_weight"', '"layer_norm_bias"', "self.zero_centered_gamma",
                 '"weight"', '"bias"'):
        assert name in source, name
    assert "self.zero_centered_gamma" in te_source.source_of(f"{PYTORCH}.LayerNorm") or \
        "self.zero_centered_gamma" in te_source.source_of(f"{PYTORCH}.ops.LayerNorm")
    assert {"E4M3", "HYBRID"} <= te_source.enum_members(f"{RECIPE}.Format")
    base = te_source.source_of("transformer_engine.pytorch.module.base."
                               "TransformerEngineBaseModule")
    assert "def get_extra_state" in base and "torch.uint8" in base  # a byte tensor


def test_checker_catches_a_wrong_keyword(te_source):
    """The check can fail: a keyword TE does not take is reported."""
    sig = te_source.signature(f"{PYTORCH}.Linear")
    assert sig.accepts("parallel_mode") and not sig.accepts("parallel_style")
    assert not te_source.signature(f"{PYTORCH}.LayerNorm").accepts("elementwise_affine")
