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
3. the ops whose self time per step differs most between the two, so that the gap is
   attributable op by op.
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.benchmark_training import framework_runner, hf_runner, time_steps  # noqa: E402

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


if __name__ == "__main__":
    main()
