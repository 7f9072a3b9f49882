"""Runs inside a virtual environment with pip's megatron-core 0.16.1 (never imports ours):
builds megatron-core GPTModels on CPU and writes Megatron-LM `torch`-format checkpoints of
them, as Megatron-LM's save_checkpoint does, plus what a reader must find in them.

    python mcore_checkpoint_side.py <json arguments> <output directory>

Writes under the output directory, for each layout in LAYOUTS (one process per rank, forked
from this one, gloo through a file store):

    <layout>_local/    local-spec names (``get_gpt_layer_local_spec``), as megatron-core saves
    <layout>_te/       the same weights under TransformerEngine-spec names, with the
                       ``_extra_state`` entries TE modules write (TE cannot run on a CPU)
    expected_<layout>.pt   whole one-process tensors gathered from the ranks' parameters by
                           their partition_dim / partition_stride, under our names
    logits.pt          megatron-core's own logits of the one-process model for fixed tokens
    qk_layernorm_local/    a one-process model built with --qk-layernorm (weights drawn as
                           below), with expected_qk_layernorm.pt and logits_qk_layernorm.pt

Every layout holds the same whole weights (drawn per parameter name, then split as
megatron-core splits them), so one set of logits serves all. megatron-core asks CUDA for
devices and RNG states even on a CPU; the shims in ``_cpu_shims`` answer with the CPU's.
"""

import argparse
import functools
import io
import json
import os
import random
import signal
import sys
import warnings
import zlib

import numpy as np
import torch

MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, seq_length=32, max_position_embeddings=32,
             rotary_base=100000, vocab_size=100, make_vocab_size_divisible_by=64,
             padded_vocab_size=128, norm_epsilon=1e-5)
LAYOUTS = {
    "tp1": dict(tp=1, pp=1),
    "tp2pp2vp": dict(tp=2, pp=2, layers_per_virtual_stage=1),
    "tp2pp2uneven": dict(tp=2, pp=2, first=1),
}
ITERATION, GLOBAL_BATCH, SEED = 3, 8, 1234


def _cpu_shims():
    """Let megatron-core run on a CPU: CUDA devices become the CPU, CUDA RNG states the CPU
    generator's (so Megatron-LM's 'cuda_rng_state' and tracker states are CPU states here)."""
    def on_cpu(fn):
        @functools.wraps(fn)
        def wrapped(*a, **k):
            if str(k.get("device", "")).startswith("cuda"):
                k["device"] = "cpu"
            return fn(*a, **k)
        return wrapped
    for name in ("tensor", "zeros", "ones", "empty", "full", "arange"):
        setattr(torch, name, on_cpu(getattr(torch, name)))
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: None
    import megatron.core.tensor_parallel.random as mcore_random
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def megatron_lm_args(layout: dict, **overrides) -> argparse.Namespace:
    """The arguments Megatron-LM 0.16's parse_args + validate_args record for this model
    (the model's, the layout's and a sample of the rest, with the types Megatron stores)."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend
    tp, pp = layout["tp"], layout["pp"]
    per_chunk = layout.get("layers_per_virtual_stage")
    vp = MODEL["num_layers"] // (pp * per_chunk) if per_chunk else None
    m = MODEL
    args = dict(
        num_layers=m["num_layers"], encoder_num_layers=m["num_layers"], decoder_num_layers=None,
        hidden_size=m["hidden_size"], ffn_hidden_size=m["ffn_hidden_size"],
        num_attention_heads=m["num_attention_heads"], kv_channels=16,
        group_query_attention=True, num_query_groups=m["num_query_groups"],
        seq_length=m["seq_length"], encoder_seq_length=m["seq_length"],
        max_position_embeddings=m["max_position_embeddings"],
        position_embedding_type="rope", use_rotary_position_embeddings=False,
        add_position_embedding=True, rotary_base=m["rotary_base"], rotary_percent=1.0,
        rotary_interleaved=False, rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=False, rope_scaling_factor=8.0, rope_type=None, no_rope_freq=None,
        mrope_section=None, normalization="RMSNorm", layernorm_epsilon=m["norm_epsilon"],
        layernorm_zero_centered_gamma=False, qk_layernorm=False, qk_l2_norm=False,
        swiglu=True, squared_relu=False, quick_geglu=False, openai_gelu=False,
        glu_linear_offset=0.0, activation_func_clamp_value=None,
        add_bias_linear=False, add_qkv_bias=False,
        apply_residual_connection_post_layernorm=False, apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=False, softmax_type="vanilla", window_size=None,
        attention_output_gate=False, multi_latent_attention=False, num_experts=None,
        mtp_num_layers=None, experimental_attention_variant=None, spec=None,
        heterogeneous_layers_config_path=None, is_hybrid_model=False,
        hybrid_override_pattern=None, use_legacy_models=False, transformer_impl="local",
        untie_embeddings_and_output_weights=True, make_vocab_size_divisible_by=m[
            "make_vocab_size_divisible_by"], padded_vocab_size=m["padded_vocab_size"],
        init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0,
        attention_backend=AttnBackend.auto, model_type=ModelType.encoder_or_decoder,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        transformer_pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=per_chunk,
        virtual_pipeline_model_parallel_size=vp, num_virtual_stages_per_pipeline_rank=None,
        decoder_first_pipeline_num_layers=layout.get("first"),
        decoder_last_pipeline_num_layers=layout.get("last"),
        pipeline_model_parallel_layout=None, account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False, sequence_parallel=False,
        context_parallel_size=1, expert_model_parallel_size=1, data_parallel_size=1,
        world_size=tp * pp, rank=0, local_rank=0, use_distributed_optimizer=False,
        distributed_backend="gloo", fp16=False, bf16=False, fp8=None,
        params_dtype=torch.float32, main_grads_dtype=torch.float32,
        main_params_dtype=torch.float32, exp_avg_dtype=torch.float32,
        exp_avg_sq_dtype=torch.float32, tokenizer_type="NullTokenizer",
        vocab_size=m["vocab_size"], vocab_file=None, merge_file=None, tokenizer_model=None,
        micro_batch_size=2, global_batch_size=GLOBAL_BATCH, train_iters=10, lr=1e-3,
        min_lr=1e-4, lr_decay_style="cosine", lr_warmup_iters=0, weight_decay=0.01,
        clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, seed=SEED,
        data_parallel_random_init=False, consumed_train_samples=ITERATION * GLOBAL_BATCH,
        consumed_valid_samples=0, skipped_train_samples=0, iteration=ITERATION,
        ckpt_format="torch", save="ckpt", load=None, save_interval=ITERATION,
        no_save_optim=None, no_save_rng=None, mock_data=True, split="969, 30, 1",
        cp_comm_type=["p2p"], cuda_graph_scope=[], exit_signal=signal.SIGTERM,
        use_cpu_initialization=True, use_mcore_models=True)
    args.update(overrides)
    return argparse.Namespace(**args)


def transformer_config(layout: dict, **overrides):
    """The TransformerConfig Megatron-LM's core_transformer_config_from_args builds."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    m = MODEL
    per_chunk = layout.get("layers_per_virtual_stage")
    vp = m["num_layers"] // (layout["pp"] * per_chunk) if per_chunk else None
    kwargs = dict(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"],
        num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_query_groups"],
        ffn_hidden_size=m["ffn_hidden_size"], kv_channels=16, normalization="RMSNorm",
        layernorm_epsilon=m["norm_epsilon"], gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=layout["tp"], pipeline_model_parallel_size=layout["pp"],
        virtual_pipeline_model_parallel_size=vp,
        num_layers_in_first_pipeline_stage=layout.get("first"),
        num_layers_in_last_pipeline_stage=layout.get("last"),
        # the fused CUDA kernels' switches (same numerics, unfused on a CPU)
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_chunks(config, layout: dict, **spec_kwargs):
    """This rank's model chunks, as Megatron-LM's get_model builds them."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    vp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for i in range(vp or 1):
        stage = i if vp else None
        chunks.append(GPTModel(
            config, get_gpt_layer_local_spec(normalization="RMSNorm", **spec_kwargs),
            vocab_size=MODEL["padded_vocab_size"],
            max_sequence_length=MODEL["max_position_embeddings"],
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=False, position_embedding_type="rope",
            rotary_percent=1.0, rotary_base=MODEL["rotary_base"], vp_stage=stage))
    return chunks


def canonical(local: str, chunk) -> str:
    """The one-process name of a chunk's parameter: layers by global 0-based index."""
    parts = local.split(".")
    if local.startswith("decoder.layers."):
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def whole_tensor(name: str, shape) -> torch.Tensor:
    """The one-process value of parameter ``name``: gains near 1, the rest N(0, s) with s
    chosen so activations neither vanish nor explode (logits span several units)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=g)
    if "layernorm" in name:
        return 1.0 + 0.2 * noise
    if name.endswith("bias"):
        return 0.1 * noise
    return noise * (0.5 if "embeddings" in name else 1.0 / shape[-1] ** 0.5)


def whole_shape(param, tp: int):
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return tuple(shape)


def tp_split(full: torch.Tensor, param, tp: int, rank: int) -> torch.Tensor:
    """This rank's shard, as megatron-core's _initialize_affine_weight_cpu takes it."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = torch.split(full, full.shape[dim] // (tp * stride), dim=dim)
    return torch.cat(pieces[rank::tp], dim=dim)


def tp_gather(param, group, tp: int) -> torch.Tensor:
    """The whole tensor from every tensor-parallel rank's shard (partition_dim / stride)."""
    import torch.distributed as dist
    shard = param.detach()
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return shard.clone()
    shards = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(shards, shard.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def te_state(local_state: dict) -> dict:
    """The state dict megatron-core's TransformerEngine spec gives the same model: norms
    fused into the next linear layer (TE LayerNormLinear's ``layer_norm_weight``), and the
    ``_extra_state`` of TE modules (an empty uint8 tensor without FP8 state in TE >= 1.6;
    older TE wrote a BytesIO, kept here for core attention)."""
    renames = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
               "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias"}
    te_modules = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    out = {}
    for key, value in local_state.items():
        for old, new in renames.items():
            if key.endswith("." + old):
                key = key[:-len(old)] + new
        if key.endswith("._extra_state") and key.split(".")[-2] in te_modules:
            value = torch.empty(0, dtype=torch.uint8)
        if key.endswith("self_attention.linear_proj.weight"):
            out[key.replace("linear_proj.weight", "core_attention._extra_state")] = io.BytesIO()
        out[key] = value
    return out


def megatron_rng_state():
    """Megatron-LM's get_rng_state for the torch format (no data-parallel random init)."""
    from megatron.core import tensor_parallel
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "cuda_rng_state": torch.cuda.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}]


def checkpoint_path(root: str, tp_rank: int, pp_rank: int, pp: int) -> str:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(root, f"iter_{ITERATION:07d}", name, "model_optim_rng.pt")


def save(root: str, state: dict, tp_rank: int, pp_rank: int, pp: int) -> None:
    path = checkpoint_path(root, tp_rank, pp_rank, pp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


def optimizer_and_scheduler(chunks, config):
    """Megatron-LM's optimizer (get_megatron_optimizer with the standard overrides) and LR
    schedule, stepped ITERATION times on made-up gradients so the state is not empty."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import (
        OptimizerConfig,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )
    wrapped = [DistributedDataParallel(config, DistributedDataParallelConfig(), c)
               for c in chunks]
    # clip_grad=0: megatron-core's grad clipping asserts CUDA tensors
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.01,
                                 clip_grad=0.0, params_dtype=torch.float32)
    optimizer = get_megatron_optimizer(opt_config, wrapped,
                                       config_overrides=get_standard_config_overrides(opt_config))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=0,
        lr_decay_steps=10 * GLOBAL_BATCH, lr_decay_style="cosine", start_wd=0.01,
        end_wd=0.01, wd_incr_steps=10 * GLOBAL_BATCH, wd_incr_style="constant")
    g = torch.Generator().manual_seed(7)
    for _ in range(ITERATION):
        for chunk in wrapped:
            for p in chunk.module.parameters():
                p.main_grad.copy_(0.01 * torch.randn(p.shape, generator=g))
        optimizer.step()
        scheduler.step(increment=GLOBAL_BATCH)
    return optimizer, scheduler


def rank_main(rank: int, name: str, layout: dict, out: str) -> None:
    import torch.distributed as dist

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    tp, pp = layout["tp"], layout["pp"]
    per_chunk = layout.get("layers_per_virtual_stage")
    vp = MODEL["num_layers"] // (pp * per_chunk) if per_chunk else None
    dist.init_process_group("gloo", init_method=f"file://{out}/.store_{name}", rank=rank,
                            world_size=tp * pp)
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vp)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    seed = SEED + 100 * pp_rank  # Megatron-LM's _set_random_seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    config = transformer_config(layout)
    chunks = build_chunks(config, layout)
    optimizer, scheduler = optimizer_and_scheduler(chunks, config)
    gathered = {}
    with torch.no_grad():
        for chunk in chunks:
            for local, param in chunk.named_parameters():
                whole = canonical(local, chunk)
                full = whole_tensor(whole, whole_shape(param, tp))
                param.copy_(tp_split(full, param, tp, tp_rank))
                gathered[whole] = tp_gather(param, ps.get_tensor_model_parallel_group(), tp)
                assert torch.equal(gathered[whole], full), whole  # gather inverts the split
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    models = {k: c.state_dict_for_save_checkpoint() for k, c in zip(keys, chunks)}
    common = {"args": megatron_lm_args(layout), "checkpoint_version": 3.0,
              "iteration": ITERATION, "optimizer": optimizer.state_dict(),
              "opt_param_scheduler": scheduler.state_dict(), "rng_state": megatron_rng_state(),
              "num_floating_point_operations_so_far": 1.5e9}
    save(os.path.join(out, f"{name}_local"), {**common, **models}, tp_rank, pp_rank, pp)
    save(os.path.join(out, f"{name}_te"),
         {**common, "args": megatron_lm_args(layout, transformer_impl="transformer_engine"),
          **{k: te_state(v) for k, v in models.items()}}, tp_rank, pp_rank, pp)
    if tp_rank == 0:
        torch.save(gathered, os.path.join(out, f".gathered_{name}_{pp_rank}.pt"))
    if name == "tp1":
        write_logits(chunks[0], out)
        write_qk_layernorm(layout, out)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def write_logits(model, out: str, name: str = "logits.pt") -> None:
    """megatron-core's own forward of the one-process model (fp32, eval) on fixed tokens."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 24), generator=g)
    positions = torch.arange(24).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(24, 24, dtype=torch.bool), diagonal=1)[None, None]
    model.eval()
    with torch.no_grad():
        logits = model(tokens, positions, mask)
    torch.save({"tokens": tokens, "logits": logits.float()}, os.path.join(out, name))


def write_qk_layernorm(layout: dict, out: str) -> None:
    """A one-process checkpoint of a model built with --qk-layernorm (megatron-core's
    q_layernorm / k_layernorm: RMSNorm over head_dim), its tensors and its logits."""
    config = transformer_config(layout, qk_layernorm=True)
    model = build_chunks(config, layout, qk_layernorm=True)[0]
    expected = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(whole_tensor(name, param.shape))
            expected[name] = param.detach().clone()
    torch.save(expected, os.path.join(out, "expected_qk_layernorm.pt"))
    write_logits(model, out, "logits_qk_layernorm.pt")
    state = {"args": megatron_lm_args(layout, qk_layernorm=True), "checkpoint_version": 3.0,
             "iteration": ITERATION, "model": model.state_dict_for_save_checkpoint(),
             "rng_state": megatron_rng_state()}
    root = os.path.join(out, "qk_layernorm_local")
    save(root, state, 0, 0, 1)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(ITERATION))


def main(arguments: dict, out: str) -> None:
    import torch.multiprocessing as mp
    warnings.filterwarnings("ignore")
    _cpu_shims()
    from megatron.core.models.gpt import GPTModel  # noqa: F401 - imported once, then forked
    from megatron.core.optimizer import get_megatron_optimizer  # noqa: F401
    os.makedirs(out, exist_ok=True)
    for name in arguments.get("layouts", list(LAYOUTS)):
        layout = LAYOUTS[name]
        mp.start_processes(rank_main, args=(name, layout, out), nprocs=layout["tp"] * layout["pp"],
                           join=True, start_method="fork")
        for kind in ("local", "te"):
            with open(os.path.join(out, f"{name}_{kind}", "latest_checkpointed_iteration.txt"),
                      "w") as f:
                f.write(str(ITERATION))
        expected = {}
        for p in range(layout["pp"]):
            part = os.path.join(out, f".gathered_{name}_{p}.pt")
            expected.update(torch.load(part, weights_only=True))
            os.remove(part)
        torch.save(expected, os.path.join(out, f"expected_{name}.pt"))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2])
