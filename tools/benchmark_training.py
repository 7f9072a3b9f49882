"""Training throughput of this framework against a minimal plain-PyTorch loop, per placement.

    python tools/benchmark_training.py --num-layers 4 --hidden-size 256 --seq-length 512

For each norm placement it times (a) the framework's real training step -- mock GPTDataset
and DataLoader, the no-pipelining schedule, the gradient buffer, AdamW with clipping, the LR
schedule -- and (b) a plain PyTorch model of the same shape and placement trained with
torch.optim.AdamW and clip_grad_norm_ on ready-made batches. The two are timed in
alternating rounds so that machine noise hits both alike. Model FLOP utilization is
measured against the fp32 matmul rate this machine reaches first. Prints a table; exits 1 if
a target is missed (framework >= 90% of plain for every placement; Peri-LN <= 110% of Pre-LN).

    python tools/benchmark_training.py --num-layers 2 --hidden-size 128 --seq-length 128 \
        --compare-fp8 [--fp8-format hybrid] [--fp8-recipes delayed tensorwise]

``--compare-fp8`` also times the same framework step with the transformer layers' GEMMs in
FP8 (``TransformerConfig(fp8=FP8Recipe(...))``: torch._scaled_mm, with ``fp8_step`` after the
optimizer step as the training loop calls it), once per recipe, in the same alternating rounds,
and prints a second table per placement: the fp32 step time, each recipe's FP8 step time and
the ratio FP8 / fp32. The FP8 table is informational (on a CPU ``_scaled_mm`` is emulated, so
FP8 is expected to be slower there); it sets no target and does not change the exit code.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTLowLevelDataset
from megatron.core.datasets.samplers import MegatronPretrainingSampler
from megatron.core.datasets.utils import Split
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.fp8 import FP8Recipe, fp8_metas, fp8_step
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig
from megatron.training.learning_rates import OptimizerParamScheduler


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """The fp32 matmul rate this machine reaches (best of several timings)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n ** 3 / best / 1e9


def model_flops_per_step(a, tokens: int) -> float:
    """Forward + backward matmul FLOPs of one step (3x forward; attention scores counted
    as computed in full, as Megatron's formula counts them)."""
    h, f, s, L, v = a.hidden_size, 4 * a.hidden_size, a.seq_length, a.num_layers, a.vocab_size
    per_token = L * (2 * 4 * h * h + 2 * 2 * h * f + 2 * 2 * s * h) + 2 * h * v
    return 3 * per_token * tokens


class PlainBlock(nn.Module):
    """One transformer layer written directly in PyTorch, with the placement's norms."""

    def __init__(self, h, heads, placement):
        super().__init__()
        self.heads, self.placement = heads, placement
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
        self.n1, self.n2 = nn.LayerNorm(h), nn.LayerNorm(h)
        if placement == "peri":
            self.n1_out, self.n2_out = nn.LayerNorm(h), nn.LayerNorm(h)

    def attn(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, h))

    def mlp(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x):
        if self.placement == "post":
            x = self.n1(x + self.attn(x))
            return self.n2(x + self.mlp(x))
        if self.placement == "peri":
            x = x + self.n1_out(self.attn(self.n1(x)))
            return x + self.n2_out(self.mlp(self.n2(x)))
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class PlainGPT(nn.Module):
    def __init__(self, a, placement):
        super().__init__()
        h = a.hidden_size
        self.wte, self.wpe = nn.Embedding(a.vocab_size, h), nn.Embedding(a.seq_length, h)
        kinds = [placement] * a.num_layers
        if placement == "mix":
            n_post = int(0.25 * a.num_layers + 0.5)
            kinds = ["post"] * n_post + ["pre"] * (a.num_layers - n_post)
        self.blocks = nn.ModuleList(PlainBlock(h, a.num_attention_heads, k) for k in kinds)
        self.ln_f = nn.LayerNorm(h) if placement != "post" else nn.Identity()

    def forward(self, ids, labels):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


def plain_runner(a, placement):
    torch.manual_seed(0)
    model = PlainGPT(a, placement)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab_size, (a.micro_batch_size, a.seq_length + 1), generator=g)
               for _ in range(4)]

    def step(i):
        batch = batches[i % len(batches)]
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def framework_runner(a, placement, fp8=None):
    """The framework's training step; ``fp8``: an FP8Recipe for the transformer layers' GEMMs
    (its delayed scales updated after each optimizer step, as the training loop does)."""
    set_random_seed(0)
    config = TransformerConfig(num_layers=a.num_layers, hidden_size=a.hidden_size,
                               num_attention_heads=a.num_attention_heads,
                               norm_placement=placement, hidden_dropout=0.0,
                               attention_dropout=0.0, max_position_embeddings=a.seq_length,
                               fp8=fp8)
    model = DistributedDataParallel(DistributedDataParallelConfig(),
                                    GPTModel(config, a.vocab_size))
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-4), [model])
    sched = OptimizerParamScheduler(opt, 0.0, 1e-4, 1e-5, 0, 10 ** 9, "cosine", 0.01)
    low = MockGPTLowLevelDataset(a.vocab_size - 1, a.vocab_size - 1)
    data = GPTDataset(low, np.arange(len(low)), 10 ** 5, Split.train,
                      GPTDatasetConfig(sequence_length=a.seq_length, eod=a.vocab_size - 1))
    loader = torch.utils.data.DataLoader(data, batch_sampler=MegatronPretrainingSampler(
        len(data), 0, a.micro_batch_size, 0, 1), num_workers=0)
    it = iter(loader)
    metas = fp8_metas(model) or None

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], labels=b["labels"])
        mask = b["loss_mask"].reshape(-1)
        return out, lambda o: ((o.reshape(-1) * mask).sum() / mask.sum(),) * 2

    def step(i):
        model.zero_grad_buffer()
        forward_backward_no_pipelining(forward_step_func=forward_step, data_iterator=it,
                                       model=model, num_microbatches=1,
                                       grad_scale_func=opt.scale_loss)
        model.finish_grad_sync()
        opt.step()
        sched.step(a.micro_batch_size)
        if metas is not None:
            fp8_step(metas)
    return step


def time_steps(step, n: int, offset: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        step(offset + i)
    return (time.perf_counter() - start) / n


def print_fp8_table(fp32_ms: dict, fp8_ms: dict, recipes, fmt: str) -> None:
    """Per placement: the fp32 step, each recipe's FP8 step and the ratio FP8 / fp32."""
    print(f"FP8 GEMMs ({fmt}) against fp32, framework step (informational, no target):")
    header = f"{'placement':>9} | {'fp32 ms':>8}" + "".join(
        f" | {r + ' ms':>13} | {r + '/fp32':>15}" for r in recipes)
    print(header)
    print("-" * len(header))
    for placement, fp32 in fp32_ms.items():
        row = f"{placement:>9} | {fp32:8.1f}"
        for r in recipes:
            row += f" | {fp8_ms[placement][r]:13.1f} | {fp8_ms[placement][r] / fp32:15.2f}"
        print(row)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--placements", nargs="+", default=["pre", "post", "peri", "mix"])
    p.add_argument("--compare-fp8", action="store_true",
                   help="also time the framework step with FP8 GEMMs and print FP8 / fp32")
    p.add_argument("--fp8-format", default="hybrid", choices=["e4m3", "hybrid"],
                   help="FP8 format of --compare-fp8")
    p.add_argument("--fp8-recipes", nargs="+", default=["delayed", "tensorwise"],
                   choices=["delayed", "tensorwise"], help="FP8 recipes of --compare-fp8")
    return p.parse_args()


def main():
    a = parse_args()
    recipes = list(dict.fromkeys(a.fp8_recipes)) if a.compare_fp8 else []
    peak = matmul_gflops()
    tokens = a.micro_batch_size * a.seq_length
    flops = model_flops_per_step(a, tokens)
    print(f"fp32 matmul rate: {peak:.1f} GFLOP/s; {torch.get_num_threads()} threads; "
          f"{tokens} tokens per step")
    header = f"{'placement':>9} | {'plain tok/s':>11} | {'ours tok/s':>10} | {'ours/plain':>10} " \
             f"| {'ours MFU':>8} | {'step ms':>7}"
    print(header)
    print("-" * len(header))
    results, fp8_ms = {}, {}
    for placement in a.placements:
        runners = {"plain": plain_runner(a, placement), "ours": framework_runner(a, placement)}
        for recipe in recipes:
            runners[recipe] = framework_runner(
                a, placement, FP8Recipe(format=a.fp8_format, recipe=recipe))
        for step in runners.values():  # warm-up
            time_steps(step, 2, 0)
        times = {name: [] for name in runners}
        for r in range(a.rounds):
            for name, step in runners.items():
                times[name].append(time_steps(step, a.steps, 2 + r * a.steps))
        # the median round is robust to a slow outlier round on a shared machine
        plain, ours = (statistics.median(times[k]) for k in ("plain", "ours"))
        results[placement] = (plain, ours)
        fp8_ms[placement] = {r: statistics.median(times[r]) * 1e3 for r in recipes}
        print(f"{placement:>9} | {tokens / plain:11.0f} | {tokens / ours:10.0f} | "
              f"{plain / ours:10.1%} | {flops / ours / 1e9 / peak:8.1%} | {ours * 1e3:7.1f}")
    ok = all(plain / ours >= 0.90 for plain, ours in results.values())
    if "pre" in results and "peri" in results:
        ratio = results["peri"][1] / results["pre"][1]
        print(f"Peri-LN step / Pre-LN step: {ratio:.3f} (target <= 1.10)")
        ok = ok and ratio <= 1.10
    if recipes:
        print_fp8_table({k: ours * 1e3 for k, (_, ours) in results.items()}, fp8_ms, recipes,
                        a.fp8_format)
    print("targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
