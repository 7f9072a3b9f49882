"""Per-rank memory under tensor, sequence and data parallelism, next to Megatron's formulas.

    python tools/benchmark_memory.py            # 4 gloo processes on this machine

For each layout of 4 ranks (TP=1/2/4, with and without sequence parallelism and the
distributed optimizer) it measures, on rank 0 of a bf16 GPT after one training step:

- parameter + gradient + optimizer bytes (every tensor the model, the gradient buffer and the
  optimizer hold), against Megatron-LM's bytes per parameter -- 18 (bf16 parameters, fp32
  gradients, fp32 master weights and Adam moments), or 6 + 12/d with the distributed
  optimizer over d data-parallel ranks -- times Psi/t, the model's parameter count split
  t ways;
- activation bytes one transformer layer keeps for backward (saved-tensor hooks), against
  Korthikanti et al.'s per-layer formula with flash attention (no s^2 term): sbh x 34
  without tensor parallelism, sbh x (10 + 24/t) with it, sbh x 34/t with sequence
  parallelism (bf16 activations, 1-byte dropout masks).
Prints a table; exits 1 if a measurement is more than 10% from its formula.
"""

import os
import sys

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.layer import build_layer

L, H, HEADS, S, B, V = 4, 256, 8, 512, 2, 8192
LAYOUTS = [(1, False, False), (1, False, True), (2, False, False), (2, True, False),
           (2, True, True), (4, False, False), (4, True, False)]


def config(tp, sp):
    return TransformerConfig(num_layers=L, hidden_size=H, num_attention_heads=HEADS,
                             position_embedding_type="rope", hidden_dropout=0.1,
                             attention_dropout=0.0, params_dtype=torch.bfloat16,
                             tensor_model_parallel_size=tp, sequence_parallel=sp)


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def model_state_bytes(tp, sp, distributed):
    set_random_seed(0)
    model = DistributedDataParallel(DistributedDataParallelConfig(
        use_distributed_optimizer=distributed), GPTModel(config(tp, sp), V))
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-4, bf16=True,
                                                 use_distributed_optimizer=distributed), [model])
    ids = torch.randint(0, V, (1, 64))
    model.zero_grad_buffer()
    model(ids, torch.arange(64)[None], labels=ids).float().mean().backward()
    finalize_model_grads([model])
    opt.step()
    tensors = list(model.module.parameters()) + [model.grad_buffer]
    for group in opt.optimizer.param_groups:
        for p in group["params"]:
            tensors.append(p)
            tensors.extend(v for v in opt.optimizer.state[p].values()
                           if torch.is_tensor(v) and v.numel() > 1)
    return storage_bytes(tensors)


def layer_activation_bytes(tp, sp):
    set_random_seed(0)
    layer = build_layer(config(tp, sp), 1)
    x = torch.randn(S // tp if sp else S, B, H, dtype=torch.bfloat16, requires_grad=True)
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return storage_bytes(saved)


def measure():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rows = []
    for tp, sp, distributed in LAYOUTS:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        rows.append((tp, sp, distributed, model_state_bytes(tp, sp, distributed),
                     layer_activation_bytes(tp, sp)))
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return rows


def _worker(rank, port, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="4", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    rows = measure()
    if rank == 0:
        queue.put(rows)


def main() -> int:
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(port, queue), nprocs=4, start_method="spawn")
    rows = queue.get()
    psi = 12 * L * H * H + 13 * L * H + V * H  # Megatron's count (rope: no position table)
    sbh = S * B * H
    print(f"GPT: {L} layers, hidden {H}, {HEADS} heads, vocab {V}, seq {S}, micro-batch {B}, "
          f"bf16, {psi / 1e6:.2f} M parameters; 4 ranks, rank 0 shown")
    head = (f"{'layout':<28} | {'state MB':>8} | {'formula':>8} | {'ratio':>5} | "
            f"{'act/layer MB':>12} | {'formula':>8} | {'ratio':>5}")
    print(head)
    print("-" * len(head))
    ok = True
    for tp, sp, distributed, state, act in rows:
        dp = 4 // tp
        per_param = 6 + 12 / dp if distributed else 18
        state_formula = per_param * psi / tp
        act_formula = sbh * (34 / tp if sp else (34 if tp == 1 else 10 + 24 / tp))
        name = f"TP={tp} DP={dp}" + (" SP" if sp else "") + (" dist-opt" if distributed else "")
        r1, r2 = state / state_formula, act / act_formula
        ok &= abs(r1 - 1) <= 0.10 and abs(r2 - 1) <= 0.10
        print(f"{name:<28} | {state / 2**20:8.2f} | {state_formula / 2**20:8.2f} | {r1:5.2f} | "
              f"{act / 2**20:12.2f} | {act_formula / 2**20:8.2f} | {r2:5.2f}")
    print("all within 10% of the formulas" if ok else "OFF BY MORE THAN 10%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
