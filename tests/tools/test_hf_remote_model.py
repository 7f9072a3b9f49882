"""The trust_remote_code Hugging Face model (tools/checkpoint/modeling_megatron_gpt.py) holds
every model we train: same logits as our GPTModel, greedy generation with a KV cache equal to
ours recomputed from scratch, left-padded batches equal to single prompts."""

import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from tests.helpers import REPO

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="needs safetensors")
sys.path.insert(0, os.path.join(REPO, "tools", "checkpoint"))
import hf_remote  # noqa: E402

VOCAB, PADDED_VOCAB = 300, 384
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": None, "pad_token_id": 0}


def make_args(**overrides) -> dict:
    """Stored training arguments (flag names with underscores) of a tiny model."""
    args = dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                group_query_attention=False, kv_channels=16, ffn_hidden_size=None,
                norm_placement="pre", mix_ln_alpha=0.5, embedding_norm=False,
                normalization="LayerNorm", norm_epsilon=1e-5, swiglu=False, add_bias_linear=True,
                position_embedding_type="learned_absolute", rotary_base=10000,
                rotary_percent=1.0, max_position_embeddings=64, seq_length=64,
                untie_embeddings_and_output_weights=False, hidden_dropout=0.0,
                attention_dropout=0.0, params_dtype="float32")
    args.update(overrides)
    return args


def build_ours(args: dict) -> GPTModel:
    """Our model from ``args``, with random norm gains and biases so that every norm and bias
    is exercised (they start as ones and zeros)."""
    cfg = TransformerConfig(
        num_layers=args["num_layers"], hidden_size=args["hidden_size"],
        num_attention_heads=args["num_attention_heads"], kv_channels=args["kv_channels"],
        num_query_groups=args["num_query_groups"] if args["group_query_attention"] else None,
        norm_placement=args["norm_placement"], mix_ln_alpha=args["mix_ln_alpha"],
        embedding_norm=args["embedding_norm"], normalization=args["normalization"],
        norm_epsilon=args["norm_epsilon"], gated_linear_unit=args["swiglu"],
        add_bias_linear=args["add_bias_linear"],
        position_embedding_type=args["position_embedding_type"],
        rotary_base=args["rotary_base"], rotary_percent=args["rotary_percent"],
        max_position_embeddings=args["max_position_embeddings"],
        share_embeddings_and_output_weights=not args["untie_embeddings_and_output_weights"],
        hidden_dropout=0.0, attention_dropout=0.0, init_seed=1234,
        # 5x Megatron's default std: sharp enough attention that positions, padding masks and
        # the exact GELU move logits and greedy tokens (at 0.02 a tiny model barely attends).
        init_method_std=0.1)
    args["ffn_hidden_size"] = cfg.ffn_hidden_size  # arguments.py records the derived size
    model = GPTModel(cfg, PADDED_VOCAB)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def export(model: GPTModel, args: dict, out_dir) -> str:
    """What the exporter writes: config.json, model.safetensors with our names mapped and the
    padded vocabulary rows dropped, and the modeling file."""
    os.makedirs(out_dir, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            tensor = tensor[:VOCAB]
        state[hf_remote.remote_name(name)] = tensor.clone().contiguous()
    safetensors_torch.save_file(state, os.path.join(out_dir, "model.safetensors"),
                                metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_remote.remote_config(args, VOCAB, SPECIAL_IDS), f, indent=2)
    shutil.copy(hf_remote.modeling_file_path(), out_dir)
    return str(out_dir)


def load(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), f"loading reported {info}"
    return model.eval()


def export_and_load(tmp_path, **overrides):
    args = make_args(**overrides)
    ours = build_ours(args)
    return ours, load(export(ours, args, tmp_path / "hf"))


def our_logits(model, ids):
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions)[..., :VOCAB]


PLACEMENTS = [(p, n) for p in ("pre", "post", "peri", "mix") for n in ("LayerNorm", "RMSNorm")]
FEATURES = {
    "swiglu": dict(norm_placement="peri", normalization="RMSNorm", swiglu=True),
    "rope": dict(norm_placement="pre", position_embedding_type="rope"),
    "rope-partial": dict(norm_placement="peri", position_embedding_type="rope",
                         rotary_percent=0.5, rotary_base=500000),
    "no-bias": dict(norm_placement="post", add_bias_linear=False),
    "untied": dict(norm_placement="mix", untie_embeddings_and_output_weights=True),
    "gqa": dict(norm_placement="peri", group_query_attention=True, num_query_groups=2),
    "mqa-rope": dict(norm_placement="mix", group_query_attention=True, num_query_groups=1,
                     position_embedding_type="rope"),
    "embedding-norm-post": dict(norm_placement="post", embedding_norm=True),
    "embedding-norm-peri": dict(norm_placement="peri", embedding_norm=True,
                                normalization="RMSNorm", norm_epsilon=1e-6),
    "all": dict(norm_placement="peri", normalization="RMSNorm", swiglu=True,
                position_embedding_type="rope", add_bias_linear=False,
                untie_embeddings_and_output_weights=True, group_query_attention=True,
                num_query_groups=2, embedding_norm=True),
}
CASES = [pytest.param(dict(norm_placement=p, normalization=n), id=f"{p}-{n}")
         for p, n in PLACEMENTS] + [pytest.param(kw, id=k) for k, kw in FEATURES.items()]


@pytest.mark.parametrize("overrides", CASES)
def test_logits_match_ours(tmp_path, overrides):
    ours, hf = export_and_load(tmp_path, **overrides)
    expected = {hf_remote.remote_name(n) for n in ours.state_dict()}
    assert expected <= set(hf.state_dict()) <= expected | {"lm_head.weight"}
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
    # Both run the same fp32 operations in the same order, ours on [s, b, h] and HF's on
    # [b, s, h] (bitwise equal on our CPUs); another BLAS may split reductions differently
    # per layout, a few ulps (~1e-6 on logits of ~5) that three layers keep far below 1e-4,
    # while a wrong layout, norm, activation or rotary pairing moves logits by > 1e-3.
    torch.testing.assert_close(logits, our_logits(ours, ids), rtol=0, atol=1e-4)


def test_loss_is_shifted_mean_over_kept_labels(tmp_path):
    ours, hf = export_and_load(tmp_path, norm_placement="peri")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100  # e.g. a prompt that is not trained on
    with torch.no_grad():
        loss = hf(input_ids=ids, labels=labels).loss
    logits = our_logits(ours, ids)
    keep = labels[:, 1:] != -100
    expected = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training(tmp_path):
    args = make_args(norm_placement="peri", hidden_dropout=0.5, attention_dropout=0.5)
    hf = load(export(build_ours(args), args, tmp_path / "hf"))
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, hf(input_ids=ids).logits)
        hf.train()
        assert not torch.equal(hf(input_ids=ids).logits, hf(input_ids=ids).logits)


def our_greedy(model, prompt, steps):
    """Greedy decoding over the real vocabulary, recomputing the whole sequence each step."""
    seq = prompt
    for _ in range(steps):
        token = our_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], dim=1)
    return seq


GENERATE_CASES = [
    pytest.param(dict(norm_placement="peri", normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope", rotary_percent=0.5,
                      group_query_attention=True, num_query_groups=2), id="peri-rope-gqa"),
    pytest.param(dict(norm_placement="mix", embedding_norm=True,
                      untie_embeddings_and_output_weights=True), id="mix-learned"),
]


@pytest.fixture(scope="module", params=GENERATE_CASES)
def generate_pair(request, tmp_path_factory):
    args = make_args(**request.param)
    ours = build_ours(args)
    return ours, load(export(ours, args, tmp_path_factory.mktemp("hf")))


def generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(ids, max_new_tokens=32, do_sample=False, **kw)


def test_generate_matches_our_greedy_decoding(generate_pair):
    ours, hf = generate_pair
    prompt = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    cached = generate(hf, prompt, use_cache=True)
    assert cached.shape == (1, 7 + 32)
    assert torch.equal(cached, our_greedy(ours, prompt, 32))
    assert torch.equal(generate(hf, prompt, use_cache=False), cached)


def test_left_padded_batch_matches_single_prompts(generate_pair):
    _, hf = generate_pair
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, VOCAB, (1, n), generator=gen) for n in (5, 9)]
    width = max(p.shape[1] for p in prompts)
    pad = SPECIAL_IDS["pad_token_id"]
    ids = torch.stack([F.pad(p[0], (width - p.shape[1], 0), value=pad) for p in prompts])
    mask = torch.stack([F.pad(torch.ones_like(p[0]), (width - p.shape[1], 0)) for p in prompts])
    with torch.no_grad():  # a plain forward takes positions from the mask as well
        padded = hf(input_ids=ids, attention_mask=mask).logits[0, width - 5:]
        torch.testing.assert_close(padded, hf(input_ids=prompts[0]).logits[0],
                                   rtol=0, atol=1e-4)  # see test_logits_match_ours
    batch = generate(hf, ids, attention_mask=mask)
    for row, prompt in zip(batch, prompts):
        single = generate(hf, prompt)
        assert torch.equal(row[width:], single[0, prompt.shape[1]:])


def test_remote_config_fields():
    args = make_args(norm_placement="mix", swiglu=True, group_query_attention=False,
                     num_query_groups=1, untie_embeddings_and_output_weights=True,
                     params_dtype="bfloat16", kv_channels=None)
    config = hf_remote.remote_config(args, VOCAB, SPECIAL_IDS)
    assert config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_megatron_gpt.MegatronGPTForCausalLM"
    assert config["architectures"] == ["MegatronGPTForCausalLM"]
    assert (config["num_key_value_heads"], config["head_dim"]) == (4, 16)  # GQA off
    assert config["intermediate_size"] == 128  # the 2/3 rule for SwiGLU, as our config
    assert config["gated_linear_unit"] and not config["tie_word_embeddings"]
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert (config["vocab_size"], config["pad_token_id"]) == (VOCAB, 0)


def test_remote_name():
    assert hf_remote.remote_name("output_layer.weight") == "lm_head.weight"
    assert hf_remote.remote_name("decoder.layers.3.post_mlp_layernorm.bias") == \
        "model.decoder.layers.3.post_mlp_layernorm.bias"
    with pytest.raises(ValueError, match="not a parameter"):
        hf_remote.remote_name("decoder.layers.0.self_attention.linear_qkv._extra_state")
