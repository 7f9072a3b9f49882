"""Parameter groups, gradient buffers, clipping, mixed precision and loss scaling."""

import math

import pytest
import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_param_groups
from megatron.core.optimizer.grad_scaler import DynamicGradScaler
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig


def tiny_model(placement="peri", dtype=torch.float32, bias=True):
    set_random_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                            norm_placement=placement, hidden_dropout=0.0,
                            attention_dropout=0.0, params_dtype=dtype, add_bias_linear=bias)
    return GPTModel(cfg, vocab_size=32)


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_model()
    decay, no_decay = get_param_groups([model])
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["wd_mult"] == 1.0 and no_decay["wd_mult"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "decoder.layers.0.post_self_attn_layernorm.weight" in no_decay_names
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in no_decay_names
    assert "embedding.word_embeddings.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def one_step(model, optimizer, ids):
    model.zero_grad_buffer()
    loss = model(ids, torch.arange(ids.shape[1]).expand_as(ids), labels=ids).float().mean()
    optimizer.scale_loss(loss).backward()
    return optimizer.step()


def test_fp32_step_equals_plain_adamw_with_clipping():
    """Our wrapper's update equals torch AdamW + clip_grad_norm_ on a copy of the model.

    Without linear biases: the key bias's true gradient is 0 (softmax ignores a constant
    shift), so Adam would amplify rounding noise there into lr-sized, arbitrary updates."""
    ours = DistributedDataParallel(DistributedDataParallelConfig(), tiny_model(bias=False))
    ref = tiny_model(bias=False)
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.05)
    opt = get_megatron_optimizer(cfg, [ours.module])
    ref_opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": 0.1 * g["wd_mult"]}
                                 for g in get_param_groups([ref])], lr=1e-2)
    ids = torch.randint(0, 32, (2, 6))
    for _ in range(3):
        ok, norm = one_step(ours, opt, ids)
        ref_loss = ref(ids, torch.arange(6).expand_as(ids), labels=ids).mean()
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
        assert ok and norm > 0.05  # clipping was active
        # fused vs for-loop AdamW and a different reduction order: a few fp32 ulps
        assert math.isclose(norm, ref_norm.item(), rel_tol=1e-5)
    for (name, p), q in zip(ours.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_gradients_accumulate_once_per_backward():
    """Two backward passes of the same batch give exactly twice the gradient of one, on
    every step (the optimizer's .grad aliases must not leak into the next step)."""
    model = DistributedDataParallel(DistributedDataParallelConfig(), tiny_model())
    opt = get_megatron_optimizer(OptimizerConfig(lr=0.0, weight_decay=0.0, clip_grad=0.0),
                                 [model.module])
    ids = torch.randint(0, 32, (2, 6))
    pos = torch.arange(6).expand_as(ids)
    for _ in range(2):
        model.zero_grad_buffer()
        model(ids, pos, labels=ids).mean().backward()
        single = model.grad_buffer.clone()
        model(ids, pos, labels=ids).mean().backward()
        torch.testing.assert_close(model.grad_buffer, 2 * single, rtol=1e-6, atol=0)
        opt.step()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_masters(precision):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    model = DistributedDataParallel(DistributedDataParallelConfig(), tiny_model(dtype=dtype))
    assert model.grad_buffer.dtype == torch.float32
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-2, **{precision: True},
                                                 initial_loss_scale=2.0 ** 8),
                                 [model.module])
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in masters)
    ok, norm = one_step(model, opt, torch.randint(0, 32, (2, 6)))
    assert ok and math.isfinite(norm)
    for model_param, master in zip(opt.model_params, masters):
        assert model_param.dtype == dtype
        torch.testing.assert_close(model_param, master.to(dtype), rtol=0, atol=0)


def test_fp16_overflow_skips_step_and_backs_off():
    model = DistributedDataParallel(DistributedDataParallelConfig(),
                                    tiny_model(dtype=torch.float16))
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-2, fp16=True, initial_loss_scale=1024.0,
                                                 hysteresis=1), [model.module])
    before = [p.clone() for p in opt.model_params]
    model.zero_grad_buffer()
    model.grad_buffer[0] = float("inf")
    ok, norm = opt.step()
    assert not ok and norm is None and opt.get_loss_scale() == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before, opt.model_params))


def test_dynamic_scaler_hysteresis_and_growth():
    s = DynamicGradScaler(initial_scale=8.0, min_scale=1.0, growth_interval=2, hysteresis=2)
    s.update(True)
    assert s.scale == 8.0  # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 4.0
    s.update(False)
    s.update(False)
    assert s.scale == 8.0
    for _ in range(10):
        s.update(True)
    assert s.scale == 1.0  # floor


def test_bf16_and_fp16_together_refused():
    with pytest.raises(ValueError, match="bf16=True and fp16=True"):
        OptimizerConfig(bf16=True, fp16=True)
