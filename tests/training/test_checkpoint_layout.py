"""Checkpoints read at any layout as one-process tensors, and written at any other."""

import pytest
import torch

from megatron.core import ConfigError
from megatron.core.models.gpt import GPTModel
from megatron.training.checkpoint_layout import (
    ModelCheckpoint,
    config_from_args,
    fit_vocab,
    partition_of,
    retarget_args,
    save_model_checkpoint,
)
from tests.helpers import TINY_MODEL, run_pretrain


@pytest.mark.parametrize("swiglu", [False, True])
def test_partition_rules_match_the_layers(swiglu):
    """partition_of gives, for every parameter, the split its layer marks on it."""
    args = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "swiglu": swiglu, "untie_embeddings_and_output_weights": True,
            "position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
            "norm_placement": "peri", "embedding_norm": True, "padded_vocab_size": 128,
            "max_position_embeddings": 32}
    model = GPTModel(config_from_args(args), 128)
    for name, param in model.named_parameters():
        marked = (param.partition_dim, param.partition_stride) \
            if getattr(param, "tensor_model_parallel", False) else (None, 1)
        assert partition_of(name, swiglu) == marked, name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("layout") / "ckpt")
    code, _ = run_pretrain(TINY_MODEL + ["--num-layers", "4", "--train-iters", "2", "--swiglu",
                                         "--untie-embeddings-and-output-weights",
                                         "--save", ckpt])
    assert code == 0
    return ckpt


@pytest.mark.parametrize("layout", [
    dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
         num_layers_per_virtual_pipeline_stage=1),
    dict(tensor_model_parallel_size=4, pipeline_model_parallel_size=2,
         decoder_first_pipeline_num_layers=1),
])
def test_any_layout_round_trip(saved, tmp_path, layout):
    """TP=1 -> another layout -> read back: every tensor equal (the vocabulary padded with
    zero rows for the new tensor-parallel size), files dropped once read."""
    source = ModelCheckpoint(saved)
    args = retarget_args(source.args, **layout)
    out = str(tmp_path / "out")
    save_model_checkpoint(out, source.iteration, args, source.tensor)
    again = ModelCheckpoint(out)
    assert again.args["padded_vocab_size"] == args["padded_vocab_size"] >= \
        source.padded_vocab_size
    assert again.names == source.names
    source.rewind()
    for name in source.names:
        a, b = source.tensor(name), again.tensor(name)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert not b[a.shape[0]:].any()
            a = fit_vocab(a, b.shape[0])
        assert torch.equal(a, b), name
    assert not again._states  # every file unmapped after its last tensor


def test_bad_layouts_are_refused(saved):
    source = ModelCheckpoint(saved)
    with pytest.raises(ConfigError, match="num_attention_heads=4"):
        retarget_args(source.args, tensor_model_parallel_size=3)
    with pytest.raises(ConfigError, match="not divisible"):
        retarget_args(source.args, pipeline_model_parallel_size=3)
