"""Pipeline schedules: measured bubble and peak activation memory per stage, beside the
formulas.

    python tools/benchmark_pipeline.py

Bubble: the real schedules and point-to-point transfers drive stages whose forward and
backward take fixed times (0.1 s and 0.2 s per micro-batch, spent sleeping, so that four
ranks on a two-core machine do not compete for the cores and distort the timing). A stage's
bubble is its idle time over its busy time, against (p-1)/m for 1F1B and (p-1)/(v m) for the
interleaved schedule with v chunks per rank.

Memory: a real GPT stage (fp32, 4 layers per rank) on 2 ranks; the peak bytes of activations
kept for backward on each stage, against one micro-batch's activations times the number of
micro-batches the schedule keeps in flight there (1F1B: p - rank).
Prints two tables; exits 1 if a measurement is off by more than 10% (+0.02 for bubbles).
"""

import os
import socket
import sys
import time
import weakref

import torch
import torch.distributed as dist
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_pipelining,
)
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig

FORWARD_SECONDS = 0.1
SHAPE = (16, 2, 8)


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        time.sleep(seconds)
        ctx.seconds = seconds
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class SleepStage(nn.Module):
    """A stage that computes nothing but takes the time a balanced stage would."""

    def __init__(self, first: bool, last: bool, seconds: float):
        super().__init__()
        self.first, self.last, self.seconds = first, last, seconds
        self.weight = nn.Parameter(torch.ones(()))
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, _batch):
        x = torch.ones(SHAPE) * self.weight if self.first else self.input_tensor
        return _Sleep.apply(x, self.seconds)


def _forward_step(iterator, model):
    batch = next(iterator)
    out = model(batch)
    return out, lambda o: (o.sum(), {})


def measure_bubble(p: int, v: int, m: int) -> float:
    """Idle / busy on this stage for one global batch (after one warm-up batch)."""
    rank = ps.get_pipeline_model_parallel_rank()
    chunks = [SleepStage(rank == 0 and k == 0, rank == p - 1 and k == v - 1,
                         FORWARD_SECONDS / v) for k in range(v)]
    for micro in (p, m):  # a short warm-up batch, then the measured one
        dist.barrier()
        start = time.perf_counter()
        forward_backward_pipelining(
            forward_step_func=_forward_step, data_iterator=[iter(range(micro)) for _ in chunks],
            model=chunks if v > 1 else chunks[0], num_microbatches=micro, tensor_shape=SHAPE,
            dtype=torch.float32)
        dist.barrier()  # the step ends when the last stage is done: its wait is bubble too
        wall = time.perf_counter() - start
    busy = 3 * FORWARD_SECONDS * m
    return (wall - busy) / busy


class LiveActivations:
    """Bytes of tensors kept for backward that are still alive, and their peak."""

    def __init__(self, params):
        self.params = {p.data_ptr() for p in params}
        self.refs, self.current, self.peak = {}, 0, 0

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.params or key == 0:
            return t
        if key not in self.refs:
            self.refs[key] = [t.untyped_storage().nbytes(), 0]
            self.current += self.refs[key][0]
            self.peak = max(self.peak, self.current)
        self.refs[key][1] += 1
        holder = t.view_as(t)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key):
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.refs[key]


def measure_memory(m: int):
    """(peak activation bytes through 1F1B, one micro-batch's bytes) on this stage."""
    p, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    set_random_seed(0)
    config = TransformerConfig(num_layers=4 * p, hidden_size=64, num_attention_heads=4,
                               hidden_dropout=0.0, attention_dropout=0.0,
                               pipeline_model_parallel_size=p, max_position_embeddings=64)
    model = GPTModel(config, 512, pre_process=rank == 0, post_process=rank == p - 1)
    batches = [torch.randint(0, 512, (2, 64)) for _ in range(m)]

    def forward_step(iterator, model):
        ids = next(iterator)
        out = model(ids, torch.arange(64).expand(2, 64), labels=ids)
        return out, lambda o: (o.mean(), {})
    results = []
    for micro in (1, m):
        tracker = LiveActivations(model.parameters())
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
            forward_backward_pipelining(forward_step_func=forward_step,
                                        data_iterator=iter(batches[:micro]), model=model,
                                        num_microbatches=micro, tensor_shape=(64, 2, 64),
                                        dtype=torch.float32)
        results.append(tracker.peak)
    return results[1], results[0]


def _worker(rank, world, port, queue):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(pipeline_model_parallel_size=world)
    rows = []
    for v, m in ((1, 8), (1, 16), (2, 8), (2, 16)):
        if v > 1 and m % world:
            continue
        rows.append(("bubble", v, m, measure_bubble(world, v, m)))
    if world == 2:
        rows.append(("memory", 1, 8, measure_memory(8)))
    queue.put((rank, rows))
    dist.barrier()
    dist.destroy_process_group()


def run(world):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(world, port, queue), nprocs=world, start_method="spawn")
    return dict(queue.get() for _ in range(world))


def main() -> int:
    ok = True
    print(f"{'p':>2} | {'v':>2} | {'m':>3} | {'bubble per stage (measured)':<34} | formula")
    for p in (2, 4):
        results = run(p)
        for j, (kind, v, m, _) in enumerate(results[0]):
            if kind != "bubble":
                continue
            measured = [results[r][j][3] for r in range(p)]
            formula = (p - 1) / (v * m)
            ok &= all(abs(b - formula) <= 0.1 * formula + 0.02 for b in measured)
            print(f"{p:2d} | {v:2d} | {m:3d} | {' '.join(f'{b:.3f}' for b in measured):<34} | "
                  f"{formula:.3f}")
        if p == 2:
            memory = {r: results[r][-1][3] for r in range(p)}
    print("\n1F1B, p=2, m=8: peak activations kept per stage (MB)")
    print(f"{'stage':>5} | {'measured':>8} | {'in flight':>9} | {'x one micro-batch':>17}")
    for rank, (peak, one) in memory.items():
        flight = min(2 - rank, 8)
        ok &= abs(peak / (one * flight) - 1) <= 0.10
        print(f"{rank:5d} | {peak / 2**20:8.2f} | {flight:9d} | {one * flight / 2**20:17.2f}")
    print("all within tolerance" if ok else "OFF")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
