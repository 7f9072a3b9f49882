"""Where one training step of ours spends its time, next to transformers' Llama of the same shape.

    python tools/profile_step.py                       # issue 13's shape, Pre-LN
    python tools/profile_step.py --placement peri      # against Glm4ForCausalLM
    python tools/profile_step.py --rounds 9 --profile-steps 5 --row-limit 40

Builds the shape of issue 13 (fp32, 2 threads, 4 layers, hidden 256, FFN 688, 4 heads,
sequence 256, micro-batch 8, vocabulary 8192, RMSNorm + SwiGLU + RoPE, untied, no biases,
dropout 0) twice: (a) this framework's real training step, exactly as
tools/benchmark_training.py times it (mock GPTDataset and DataLoader, the gradient buffer,
the Megatron optimizer with clipping, the LR schedule, the no-pipelining schedule) and (b)
transformers' LlamaForCausalLM (Glm4ForCausalLM for ``--placement peri``) with sdpa attention,
torch.optim.AdamW with the same hyper-parameters and clip_grad_norm_ 1.0. It prints

1. the median step time of each, timed in alternating rounds after a warm-up;
2. a torch.profiler table per model (self CPU time per step, top ``--row-limit`` ops; each
   number the median over ``--profile-steps`` single-step profiles taken alternately);
3. the phases of the step (data, forward, backward, clip + optimizer, zeroing gradients);
4. the ops whose self time per step differs most between the two, so that the gap is
   attributable op by op;
5. the parts timed alone, ours against Llama's (Pre-LN shapes): one layer's attention with
   RoPE, RoPE alone, the SwiGLU MLP, one RMSNorm, the output layer + loss, the clip + AdamW
   step, and the whole model's forward + backward with and without the gradient buffer.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # noqa: E402
from megatron.core.transformer.attention import SelfAttention  # noqa: E402
from megatron.core.transformer.mlp import MLP  # noqa: E402
from megatron.core.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb  # noqa: E402
from tools.benchmark_training import (  # noqa: E402
    CLIP,
    LR,
    WEIGHT_DECAY,
    framework_config,
    framework_runner,
    hf_config,
    hf_runner,
    time_steps,
)

ISSUE_SHAPE = dict(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4,
                   seq_length=256, micro_batch_size=8, vocab_size=8192,
                   normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
                   position_embedding_type="rope", untie_embeddings_and_output_weights=True,
                   disable_bias_linear=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--placement", default="pre", choices=["pre", "peri"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--profile-steps", type=int, default=5, help="steps under the profiler")
    p.add_argument("--row-limit", type=int, default=25)
    p.add_argument("--component-reps", type=int, default=15,
                   help="repetitions of each part in the parts table (0: skip it)")
    for key, value in ISSUE_SHAPE.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, default=value, action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(flag, type=type(value), default=value)
    return p.parse_args()


def profile_one_step(step, i: int) -> dict:
    """{op name: (calls, self CPU ms, total CPU ms)} of one profiled step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(i)
    return {e.key: (e.count, e.self_cpu_time_total / 1e3, e.cpu_time_total / 1e3)
            for e in prof.key_averages()}


def per_step_ops(runners: dict, steps: int) -> dict:
    """{runner: {op: (calls, self ms, total ms)}}: each number the median over ``steps``
    profiled steps taken alternately from the runners, so a slow spell of a shared machine
    hits all of them alike and one odd step does not skew an op."""
    samples = {k: [] for k in runners}
    for i in range(steps):
        for k, runner in runners.items():
            samples[k].append(profile_one_step(runner.step, 1000 + i))
    out = {}
    for k, runs in samples.items():
        keys = set().union(*runs)
        out[k] = {key: tuple(statistics.median(r.get(key, (0, 0.0, 0.0))[j] for r in runs)
                             for j in range(3)) for key in keys}
    return out


def print_ops(title: str, ops: dict, limit: int) -> None:
    print(f"\n{title}: per step, sorted by self CPU time")
    header = f"{'op':<60} | {'calls':>6} | {'self ms':>8} | {'total ms':>8}"
    print(header + "\n" + "-" * len(header))
    rows = sorted(ops.items(), key=lambda kv: -kv[1][1])[:limit]
    for name, (calls, self_ms, total_ms) in rows:
        print(f"{name[:60]:<60} | {calls:6.1f} | {self_ms:8.2f} | {total_ms:8.2f}")
    print(f"{'sum of self time':<60} | {'':>6} | {sum(v[1] for v in ops.values()):8.2f} |")


def print_difference(ours: dict, theirs: dict, name: str, limit: int) -> None:
    print(f"\nself CPU ms per step, ours - {name} (largest differences first)")
    header = f"{'op':<52} | {'ours calls':>10} | {'ours ms':>8} | {name + ' calls':>11} | " \
             f"{name + ' ms':>8} | {'diff ms':>8}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for key in set(ours) | set(theirs):
        oc, oms, _ = ours.get(key, (0, 0.0, 0.0))
        tc, tms, _ = theirs.get(key, (0, 0.0, 0.0))
        rows.append((oms - tms, key, oc, oms, tc, tms))
    for diff, key, oc, oms, tc, tms in sorted(rows, key=lambda r: -abs(r[0]))[:limit]:
        print(f"{key[:52]:<52} | {oc:10.1f} | {oms:8.2f} | {tc:11.1f} | {tms:8.2f} | "
              f"{diff:+8.2f}")


def print_phases(ops: dict) -> None:
    """Total CPU ms per step of each phase labelled by tools/benchmark_training.py."""
    names = ("data", "forward", "forward+backward", "clip+optimizer", "zero grads")
    print("\nphases, total CPU ms per step (backward = forward+backward - forward - data)")
    header = f"{'runner':>8} | " + " | ".join(f"{n:>16}" for n in names) + f" | {'backward':>8}"
    print(header + "\n" + "-" * len(header))
    for k, table in ops.items():
        ms = {n: table.get("step: " + n, (0, 0.0, 0.0))[2] for n in names}
        backward = ms["forward+backward"] - ms["forward"] - ms["data"]
        print(f"{k:>8} | " + " | ".join(f"{ms[n]:16.1f}" for n in names) + f" | {backward:8.1f}")


def _fwd_bwd(fn, *inputs):
    """fn(*inputs) forward and backward (gradient of a sum), as one callable."""
    def run():
        out = fn(*inputs)
        out.sum().backward()
        for t in inputs:
            t.grad = None
    return run


def _components(a):
    """{part: (ours callable, transformers callable)}: one layer's parts forward + backward,
    the output layer + loss, the optimizer step and the gradient buffer's hooks."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.llama import modeling_llama as hf
    s, b, h, d = a.seq_length, a.micro_batch_size, a.hidden_size, \
        a.hidden_size // a.num_attention_heads
    config, hf_cfg = framework_config(a, "pre"), hf_config(a, "pre")
    x_sbh = torch.randn(s, b, h, requires_grad=True)
    x_bsh = torch.randn(b, s, h, requires_grad=True)
    rope = RotaryEmbedding(d)(s)
    cos_sin = hf.LlamaRotaryEmbedding(hf_cfg)(x_bsh, torch.arange(s)[None])
    q_sbhd = torch.randn(s, b, a.num_attention_heads, d, requires_grad=True)
    q_bhsd = torch.randn(b, a.num_attention_heads, s, d, requires_grad=True)
    ours_attn, hf_attn = SelfAttention(config, 1), hf.LlamaAttention(hf_cfg, 0)
    ours_mlp, hf_mlp = MLP(config), hf.LlamaMLP(hf_cfg)
    ours_norm, hf_norm = torch.nn.RMSNorm(h, eps=a.norm_epsilon), hf.LlamaRMSNorm(h)
    labels = torch.randint(0, a.vocab_size, (b, s))
    mask = torch.ones(b * s)
    w_out = torch.nn.Parameter(torch.randn(a.vocab_size, h) * 0.02)
    parts = {
        "attention incl. RoPE (x1 layer)": (
            _fwd_bwd(lambda x: ours_attn(x, None, rope), x_sbh),
            _fwd_bwd(lambda x: hf_attn(x, cos_sin, None)[0], x_bsh)),
        "RoPE on one [s,b,heads,d] tensor": (
            _fwd_bwd(lambda q: apply_rotary_pos_emb(q, rope), q_sbhd),
            _fwd_bwd(lambda q: hf.apply_rotary_pos_emb(q, q, *cos_sin)[0], q_bhsd)),
        "SwiGLU MLP (x1 layer)": (_fwd_bwd(ours_mlp, x_sbh), _fwd_bwd(hf_mlp, x_bsh)),
        "RMSNorm (x1)": (_fwd_bwd(ours_norm, x_sbh), _fwd_bwd(hf_norm, x_bsh)),
        "output layer + loss": (
            _fwd_bwd(lambda x: (vocab_parallel_cross_entropy(
                torch.nn.functional.linear(x, w_out), labels.t()).t().reshape(-1) * mask)
                .sum() / mask.sum(), x_sbh),
            _fwd_bwd(lambda x: ForCausalLMLoss(torch.nn.functional.linear(x, w_out), labels,
                                               a.vocab_size), x_bsh)),
    }
    parts["clip + AdamW step"] = _optimizer_pair(a, hf_cfg)
    parts["model fwd+bwd, with / without grad buffer"] = _grad_buffer_pair(a, config)
    return parts


def _optimizer_pair(a, hf_cfg):
    """Ours: the Megatron optimizer (clip + fused AdamW over the gradient buffer); theirs:
    clip_grad_norm_ + torch.optim.AdamW with its default (per-parameter loop on CPU)."""
    import transformers
    model = DistributedDataParallel(DistributedDataParallelConfig(),
                                    GPTModel(framework_config(a, "pre"), a.vocab_size))
    opt = get_megatron_optimizer(OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY,
                                                 clip_grad=CLIP), [model])
    model.grad_buffer.normal_(0, 1e-3)
    hf_model = transformers.LlamaForCausalLM(hf_cfg)
    hf_opt = torch.optim.AdamW(hf_model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for p in hf_model.parameters():
        p.grad = torch.randn_like(p) * 1e-3

    def theirs():
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), CLIP)
        hf_opt.step()
    return opt.step, theirs


def _grad_buffer_pair(a, config):
    """The same model's forward + backward with the gradient buffer's hooks (DDP-wrapped, as
    in the training step) and without (plain autograd accumulation)."""
    torch.manual_seed(0)
    wrapped = DistributedDataParallel(DistributedDataParallelConfig(),
                                      GPTModel(framework_config(a, "pre"), a.vocab_size))
    bare = GPTModel(framework_config(a, "pre"), a.vocab_size)
    ids = torch.randint(0, a.vocab_size, (a.micro_batch_size, a.seq_length))
    pos = torch.arange(a.seq_length)[None]

    def with_buffer():
        wrapped.zero_grad_buffer()
        wrapped(ids, pos, labels=ids).mean().backward()

    def without():
        bare.zero_grad(set_to_none=True)
        bare(ids, pos, labels=ids).mean().backward()
    return with_buffer, without


def print_components(a, reps: int) -> None:
    """Median ms of each part, ours and transformers' alternately, ``reps`` times."""
    parts = _components(a)
    print(f"\nparts, median ms over {reps} alternating repetitions (forward + backward "
          "unless noted)")
    header = f"{'part':<44} | {'ours ms':>8} | {'llama ms':>8} | {'diff ms':>8}"
    print(header + "\n" + "-" * len(header))
    for name, (ours, theirs) in parts.items():
        ours(), theirs()  # warm-up
        t = {0: [], 1: []}
        for _ in range(reps):
            for k, fn in ((0, ours), (1, theirs)):
                start = time.perf_counter()
                fn()
                t[k].append((time.perf_counter() - start) * 1e3)
        o, h = statistics.median(t[0]), statistics.median(t[1])
        print(f"{name:<44} | {o:8.2f} | {h:8.2f} | {o - h:+8.2f}")


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    name = "llama" if a.placement == "pre" else "glm4"
    runners = {"ours": framework_runner(a, a.placement), name: hf_runner(a, a.placement)}
    for runner in runners.values():  # warm-up
        time_steps(runner.step, 3, 0)
    times = {k: [] for k in runners}
    for r in range(a.rounds):
        order = list(runners) if r % 2 == 0 else list(runners)[::-1]
        for k in order:
            times[k].append(time_steps(runners[k].step, a.steps, 3 + r * a.steps))
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = statistics.median(o / t for o, t in zip(times["ours"], times[name]))
    print(f"{torch.get_num_threads()} threads; {a.rounds} rounds x {a.steps} steps; "
          f"median step ms: ours {median['ours']:.1f}, {name} {median[name]:.1f}; "
          f"ours/{name}: {median['ours'] / median[name]:.3f} (ratio of medians), "
          f"{ratio:.3f} (median of per-round ratios)")
    print("round medians ms: " + "; ".join(
        f"{k}: " + " ".join(f"{t * 1e3:.0f}" for t in v) for k, v in times.items()))
    ops = per_step_ops(runners, a.profile_steps)
    for k in runners:
        print_ops(f"{k} ({a.profile_steps} profiled steps)", ops[k], a.row_limit)
    print_phases(ops)
    print_difference(ops["ours"], ops[name], name, a.row_limit)
    if a.component_reps:
        print_components(a, a.component_reps)


if __name__ == "__main__":
    main()
