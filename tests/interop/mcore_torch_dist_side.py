"""Runs inside a virtual environment with pip's megatron-core 0.16.1 (never imports ours).

    python mcore_torch_dist_side.py <json list of cases>

Each case builds a small megatron-core GPTModel (local spec) on ``tp x pp`` gloo processes,
takes one Adam step, and saves a ``--ckpt-format torch_dist`` checkpoint under ``dir`` the way
Megatron-LM's ``megatron/training/checkpointing.py`` does: ``dist_checkpointing.save`` of the
model's (and optimizer's) sharded state dict, ``args`` as an argparse.Namespace in
``common.pt``, then the tracker file. ``expected`` (a torch file) receives the whole tensors
the model held after the step under the one-process names (``decoder.layers.<global 0-based
index>...``) and, on one process, the logits of ``tokens``.

megatron-core 0.16.1 saves on CPU with three patches, all for the absence of CUDA (the files
are the same: tensors are moved to the CPU before writing anyway): the writer calls
``torch.cuda.synchronize()`` after its (pinned, non-blocking) copies to the CPU and puts a
failure flag on ``torch.cuda.current_device()``; its writer processes ask psutil for their
memory use (a logging aid; psutil is not a dependency of the wheel).
"""

import argparse
import contextlib
import json
import os
import random
import signal
import sys

# torch and megatron-core are imported inside the functions: megatron-core's writer starts a
# helper process with "spawn", which re-imports this module (cheap when it imports no torch).


def cpu_only_patches():
    """What megatron-core's torch_dist writer needs without CUDA (see the module docstring)."""
    import torch
    if torch.cuda.is_available():
        return
    import megatron.core.dist_checkpointing.strategies.filesystem_async as writer
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        import psutil  # noqa: F401
    except ImportError:
        writer._process_memory = lambda: 0


def megatron_lm_args(a):
    """The argparse.Namespace Megatron-LM stores in common.pt (the model's part of it, and a
    sample of the rest with the types Megatron-LM stores: torch dtypes, megatron-core enums)."""
    import torch
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend
    m = a["model"]
    return argparse.Namespace(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"],
        ffn_hidden_size=m["ffn_hidden_size"], num_attention_heads=m["num_attention_heads"],
        group_query_attention=m["num_query_groups"] != m["num_attention_heads"],
        num_query_groups=m["num_query_groups"],
        kv_channels=m["hidden_size"] // m["num_attention_heads"],
        normalization=m["normalization"], norm_epsilon=1e-5, swiglu=m["swiglu"],
        add_bias_linear=m["add_bias_linear"], add_qkv_bias=m["add_bias_linear"],
        position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0,
        untie_embeddings_and_output_weights=m["untie"], softmax_type="vanilla",
        max_position_embeddings=m["seq_length"], seq_length=m["seq_length"],
        padded_vocab_size=m["vocab_size"], vocab_size=m["vocab_size"],
        make_vocab_size_divisible_by=128, tokenizer_type="NullTokenizer",
        tensor_model_parallel_size=a["tp"], pipeline_model_parallel_size=a["pp"],
        virtual_pipeline_model_parallel_size=None, sequence_parallel=False,
        transformer_impl="local", attention_backend=AttnBackend.auto,
        model_type=ModelType.encoder_or_decoder, params_dtype=torch.float32,
        main_params_dtype=torch.float32, fp16=False, bf16=False, hidden_dropout=0.0,
        attention_dropout=0.0, micro_batch_size=2, global_batch_size=2, lr=1e-3,
        iteration=a["iteration"], consumed_train_samples=2 * a["iteration"],
        consumed_valid_samples=0, ckpt_format="torch_dist", use_dist_ckpt=True,
        use_distributed_optimizer=False, save=a["dir"], load=None, seed=a["seed"],
        exit_signal=signal.SIGTERM, use_cpu_initialization=True, use_mcore_models=True)


def build_model(a):
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    m = a["model"]
    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"],
        ffn_hidden_size=m["ffn_hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], normalization=m["normalization"],
        layernorm_epsilon=1e-5, gated_linear_unit=m["swiglu"],
        activation_func=torch.nn.functional.silu if m["swiglu"] else
        torch.nn.functional.gelu, add_bias_linear=m["add_bias_linear"],
        add_qkv_bias=m["add_bias_linear"], hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=a["tp"], pipeline_model_parallel_size=a["pp"],
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
    return GPTModel(config, get_gpt_layer_local_spec(normalization=m["normalization"]),
                    vocab_size=m["vocab_size"], max_sequence_length=m["seq_length"],
                    pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(),
                    position_embedding_type="rope",
                    share_embeddings_and_output_weights=not m["untie"])


def one_adam_step(model):
    """Some optimizer state to save (under Megatron-LM's 'optimizer.state.*' keys) and weights
    that differ from their initialization."""
    import torch
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(7)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer.step()
    return optimizer


def optimizer_sharded_state_dict(optimizer, model_sharded):
    """What megatron-core's FP32Optimizer.sharded_state_dict builds around a torch optimizer."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )
    state = optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(
        model_sharded, [p for g in optimizer.param_groups for p in g["params"]])
    step = next(iter(state["state"].values()))["step"]
    optim_state_to_sharding_state(state, id_map, exclude_keys="step")
    state["state"]["common_step"] = step
    return state


def canonical_state(model):
    """This rank's tensors under one-process names (layers by their global index)."""
    import torch
    out = {}
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):  # _extra_state
            continue
        if name == "output_layer.weight" and not model.pre_process and \
                model.share_embeddings_and_output_weights:
            continue  # the last stage's copy of the tied embedding
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
        out[".".join(parts)] = tensor.detach().clone()
    return out


def worker(rank, a, parts_dir):
    import numpy as np
    import torch
    import torch.distributed as dist
    cpu_only_patches()
    world = a["tp"] * a["pp"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a['port']}", rank=rank,
                            world_size=world)
    from megatron.core.dist_checkpointing import ShardedObject

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    ps.initialize_model_parallel(a["tp"], a["pp"])
    torch.manual_seed(a["seed"])  # use_cpu_initialization: every tensor rank, same master
    model = build_model(a)
    optimizer = one_adam_step(model)
    metadata = {"singleton_local_shards": False}  # Megatron-LM's content metadata
    model_sharded = model.sharded_state_dict(metadata=metadata)
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state()}]
    state = {
        "args": megatron_lm_args(a), "checkpoint_version": 3.0, "iteration": a["iteration"],
        "model": model_sharded,
        "optimizer": optimizer_sharded_state_dict(optimizer, model_sharded),
        "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": 2 * a["iteration"]},
        "rng_state": ShardedObject("rng_state", rng, (a["pp"], a["tp"]), (pp_rank, tp_rank),
                                   replica_id=0),
        "num_floating_point_operations_so_far": 0,
    }
    iter_dir = os.path.join(a["dir"], f"iter_{a['iteration']:07d}")
    if rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, iter_dir, ("torch_dist", 1), validate_access_integrity=True,
                            content_metadata=metadata)
    if rank == 0:
        with open(os.path.join(a["dir"], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(a["iteration"]))
    part = {"tp_rank": tp_rank, "tensors": canonical_state(model)}
    if world == 1 and a.get("tokens"):
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
        # its RNG tracker needs CUDA; nothing draws random numbers here (dropout is off)
        get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()
        model.eval()
        tokens = torch.tensor(a["tokens"])
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        # True above the diagonal: masked (megatron-core builds its default mask on CUDA)
        causal = torch.ones(tokens.shape[1], tokens.shape[1]).triu(1).bool()[None, None]
        with torch.no_grad():
            part["logits"] = model(tokens, positions, attention_mask=causal)
    torch.save(part, os.path.join(parts_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def merge(parts, swiglu):
    """Whole tensors from the tensor-parallel pieces (the local spec's partitioning)."""
    import torch
    names = {}
    for part in sorted(parts, key=lambda part: part["tp_rank"]):
        for name, tensor in part["tensors"].items():
            names.setdefault(name, []).append(tensor)
    whole = {}
    for name, pieces in names.items():
        if len(pieces) == 1 or name.endswith("layernorm.weight") or name.endswith(
                "layernorm.bias") or name.endswith(("linear_proj.bias", "linear_fc2.bias")):
            whole[name] = pieces[0]  # replicated over tensor ranks
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            whole[name] = torch.cat(pieces, dim=1)
        elif swiglu and "linear_fc1" in name:  # each rank holds [its gate rows; its up rows]
            halves = [p.chunk(2, dim=0) for p in pieces]
            whole[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            whole[name] = torch.cat(pieces, dim=0)
    return whole


def main():
    import torch
    cases = json.loads(sys.argv[1])
    import megatron.core.models.gpt  # noqa: F401 - imported once, inherited by the forks
    for a in cases:  # no torch arithmetic in this process before the forks
        os.makedirs(a["expected"] + ".parts", exist_ok=True)
        torch.multiprocessing.start_processes(worker, args=(a, a["expected"] + ".parts"),
                                              nprocs=a["tp"] * a["pp"], start_method="fork")
    for a in cases:
        parts = [torch.load(os.path.join(a["expected"] + ".parts", f"rank{r}.pt"))
                 for r in range(a["tp"] * a["pp"])]
        result = {"tensors": merge(parts, a["model"]["swiglu"])}
        if "logits" in parts[0]:
            result["logits"] = parts[0]["logits"]
        torch.save(result, a["expected"])


if __name__ == "__main__":
    main()
