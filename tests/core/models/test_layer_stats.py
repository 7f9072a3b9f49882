"""LayerStatsCollector on one process: its numbers are the tensors' own statistics."""

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.layer_stats import LayerStatsCollector
from megatron.core.optimizer.optimizer import FP32Optimizer
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig


def _model(placement, **kw):
    config = TransformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4,
                               norm_placement=placement, hidden_dropout=0.0,
                               attention_dropout=0.0, **kw)
    set_random_seed(0)
    return GPTModel(config, vocab_size=128), config


def _moments(tensors):
    x = torch.cat([t.detach().double().flatten() for t in tensors])
    return {"mean": x.mean().item(), "var": x.var(unbiased=False).item(),
            "rms": x.square().mean().sqrt().item(), "max_abs": x.abs().max().item()}


def _capture(model, placement):
    """Our own hooks on the same sites: {(layer, site): [outputs]}."""
    seen, handles = {}, []

    def keep(key):
        return lambda m, i, out: seen.setdefault(key, []).append(out.detach().clone())
    handles.append(model.embedding.register_forward_hook(keep((0, "residual"))))
    for layer in model.decoder.layers:
        n = layer.layer_number
        handles.append(layer.register_forward_hook(keep((n, "residual"))))
        handles.append(layer.mlp.register_forward_hook(keep((n, "mlp"))))
        if placement == "peri":
            handles.append(layer.post_self_attn_layernorm.register_forward_hook(
                keep((n, "attention_normed"))))
    return seen, handles


@pytest.mark.parametrize("placement,extra", [("peri", {"embedding_norm": True,
                                                       "normalization": "RMSNorm"}),
                                             ("mix", {"layernorm_zero_centered_gamma": True}),
                                             ("post", {"qk_layernorm": True})])
def test_statistics_are_those_of_the_tensors(placement, extra):
    model, config = _model(placement, **extra)
    optimizer = FP32Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), clip_grad=1.0)
    collector = LayerStatsCollector([model], config)
    seen, handles = _capture(model, placement)
    collector.start()
    for _ in range(2):  # two micro-batches
        tokens = torch.randint(0, 128, (2, 16))
        loss = model(tokens, torch.arange(16).expand(2, 16), labels=tokens).mean()
        loss.backward()
    collector.stop()
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.main_grad = p.grad
    optimizer.step(before_update=lambda norm: collector.record_grads(optimizer) or True)
    layers = collector.reduce()
    assert [e["layer"] for e in layers] == list(range(5))
    assert [e["kind"] for e in layers] == ["embedding"] + [
        config.layer_placement(n).value for n in (1, 2, 3)] + ["output"]
    for (n, site), outputs in seen.items():
        expected = _moments(outputs)
        for key, value in expected.items():
            # fp32 sums per micro-batch added in float64: ~1e-7 relative; the mean is near 0
            tolerance = 1e-6 * expected["rms"] if key == "mean" else 1e-5 * abs(value)
            assert layers[n][site][key] == pytest.approx(value, abs=tolerance), (n, site, key)
    # gradient norm per layer: that of its parameters' gradients (before clipping)
    for n, layer in enumerate(model.decoder.layers, start=1):
        expected = torch.stack([p.main_grad.norm() for p in layer.parameters()]).norm().item()
        assert layers[n]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    embedding = torch.stack([p.main_grad.norm() for p in model.embedding.parameters()]).norm()
    assert layers[0]["grad_norm"] == pytest.approx(embedding.item(), rel=1e-5)
    # gains: the norm's effective gain (1 + weight for the zero-centred variant)
    first = model.decoder.layers[0]  # pre/peri: input_layernorm; post and Mix-LN's first
    name = "input_layernorm" if placement == "peri" else "self_attn_residual_layernorm"
    weight = getattr(first, name).weight.detach().double()
    gain = weight + 1 if extra.get("layernorm_zero_centered_gamma") else weight
    assert layers[1]["norms"][name]["mean"] == pytest.approx(gain.mean().item())
    assert layers[1]["norms"][name]["std"] == pytest.approx(gain.std(unbiased=False).item(),
                                                            abs=1e-9)
    if placement == "peri":
        assert set(layers[1]) >= {"attention", "attention_normed", "mlp", "mlp_normed"}
        assert "embedding_norm" in layers[0]["norms"]
        assert "final_layernorm" in layers[4]["norms"]
    if placement == "post":
        assert "attention_normed" not in layers[1] and layers[4]["norms"] == {}
        assert layers[4]["grad_norm"] is None  # tied output layer, no final norm: nothing
        assert "self_attention.q_layernorm" in layers[1]["norms"]


def test_hooks_are_gone_after_stop():
    model, config = _model("pre")
    collector = LayerStatsCollector([model], config)
    collector.start()
    collector.stop()
    assert all(not m._forward_hooks for m in model.modules())
