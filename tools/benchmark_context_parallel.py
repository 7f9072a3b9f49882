"""Context parallelism: activation memory and attention work per rank at CP = 1, 2 and 4.

    python tools/benchmark_context_parallel.py          # 4 gloo processes on this machine
    python tools/benchmark_context_parallel.py --seq-length 8192

For each CP size (the other ranks of the 4 data-parallel) every rank runs one training step of
a Peri-LN GPT (fp32, RoPE, SwiGLU, GQA) on its 1/CP of a --seq-length sequence and measures:

- the bytes of activations the whole model keeps for backward (saved-tensor hooks, each
  storage counted once; parameters excluded), against CP=1's bytes / CP;
- the FLOPs of attention alone (forward and backward, FlopCounterMode over
  context_parallel.attention's matrix multiplies; not shown at CP=1, whose CPU flash
  attention the counter does not see), on every rank, and their spread max/min across
  ranks: the 2 x CP chunk split makes them equal;
- the step's wall time on rank 0 (four processes share this machine's cores: a rough guide).

Prints a table; exits 1 if activations per rank are more than 10% from 1/CP of CP=1's, or
attention FLOPs differ across ranks by more than 10%.
"""

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig, context_parallel

WORLD = 4
L, H, HEADS, GROUPS, V = 2, 256, 8, 4, 8192


def config(cp):
    return TransformerConfig(num_layers=L, hidden_size=H, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, norm_placement="peri",
                             normalization="RMSNorm", gated_linear_unit=True,
                             add_bias_linear=False, position_embedding_type="rope",
                             hidden_dropout=0.0, attention_dropout=0.0,
                             context_parallel_size=cp)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _attention_flops(mode: FlopCounterMode) -> float:
    """Attention's own FLOPs (forward and backward) from a FlopCounterMode's per-module counts:
    each self_attention module's minus its two projections'."""
    counts = {name: sum(ops.values()) for name, ops in mode.get_flop_counts().items()}
    total = 0.0
    for name, flops in counts.items():
        if name.endswith("self_attention"):
            total += flops - counts.get(name + ".linear_qkv", 0) - \
                counts.get(name + ".linear_proj", 0)
    return total


def measure(seq: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rows = []
    for cp in (1, 2, 4):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(context_parallel_size=cp)
        set_random_seed(0)
        model = GPTModel(config(cp), V)
        g = torch.Generator().manual_seed(0)
        batch = {"tokens": torch.randint(0, V, (1, seq), generator=g),
                 "position_ids": torch.arange(seq)[None]}
        batch["labels"] = batch["tokens"].roll(-1, 1)
        batch = context_parallel.split_batch(batch)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved.append(t)
            return t
        dist.barrier()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(batch["tokens"], batch["position_ids"], labels=batch["labels"]).sum()
        activations = _storage_bytes(saved)
        saved.clear()
        loss.backward()
        seconds = time.perf_counter() - start
        with FlopCounterMode(display=False) as mode:
            model(batch["tokens"], batch["position_ids"], labels=batch["labels"]).sum() \
                .backward()
        attention = _attention_flops(mode)
        flops = [torch.zeros(1, dtype=torch.float64) for _ in range(WORLD)]
        dist.all_gather(flops, torch.tensor([attention], dtype=torch.float64))
        rows.append((cp, seq // cp, activations, [float(f) for f in flops], seconds))
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return rows


def _worker(rank, port, seq, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    rows = measure(seq)
    if rank == 0:
        queue.put(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=4096)
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(port, args.seq_length, queue), nprocs=WORLD,
                       start_method="spawn")
    rows = queue.get()
    print(f"Peri-LN GPT: {L} layers, hidden {H}, {HEADS} heads ({GROUPS} query groups), vocab "
          f"{V}, fp32, one sequence of {args.seq_length} tokens; {WORLD} ranks (the rest "
          "data-parallel)")
    head = (f"{'CP':>3} | {'tokens/rank':>11} | {'activations MB':>14} | {'x CP=1':>6} | "
            f"{'1/CP':>5} | {'attention GFLOP per rank':>30} | {'max/min':>7} | "
            f"{'step s':>6}")
    print(head)
    print("-" * len(head))
    ok = True
    base = rows[0][2]
    for cp, tokens, activations, flops, seconds in rows:
        ratio = activations / base
        ok &= abs(ratio * cp - 1) <= 0.10
        per_rank, spread = "-", "-"
        if cp > 1:
            ok &= max(flops) <= 1.10 * min(flops)
            per_rank = " ".join(f"{f / 1e9:6.2f}" for f in flops)
            spread = f"{max(flops) / min(flops):.3f}"
        print(f"{cp:>3} | {tokens:>11} | {activations / 2**20:14.1f} | {ratio:6.3f} | "
              f"{1 / cp:5.3f} | {per_rank:>30} | {spread:>7} | {seconds:6.2f}")
    print("activations fall as 1/CP and attention work is balanced (within 10%)" if ok
          else "OFF BY MORE THAN 10%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
