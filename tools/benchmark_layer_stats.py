"""What --log-layer-stats costs: the extra time of a recorded step, and what that adds to
the average step at a given --layer-stats-interval.

    python tools/benchmark_layer_stats.py [--num-layers 8 --hidden-size 128 ...] [--steps 20]

Builds the real training setup in one process (pretrain_gpt's model provider, mock data,
AdamW with clipping, the schedule) and times ``train_step`` alternately -- a plain step,
then a step that records the statistics (forward hooks, per-layer gradient norms, the
reduction, the JSONL line and its TensorBoard/W&B scalars) -- so machine noise hits both
alike. Other steps run no hooks at all, so the average overhead at interval K is
(recorded - plain) / K / plain. Prints a table; exits 1 if the overhead at the default
interval is 5% or more. Any pretrain_gpt.py flag can be added after ``--``.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pretrain_gpt  # noqa: E402
from megatron.training import log_writers  # noqa: E402
from megatron.training.initialize import initialize_megatron  # noqa: E402
from megatron.training.layer_stats import LayerStatsLog  # noqa: E402
from megatron.training.training import (  # noqa: E402
    build_data_iterators,
    setup_model_and_optimizer,
    train_step,
)
from megatron.training.update_guard import UpdateGuard  # noqa: E402

TARGET = 0.05


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--norm-placement", default="peri")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    a, extra = p.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    folder = tempfile.mkdtemp()
    steps_total = 2 * a.steps + 4
    args = initialize_megatron(None, None, [
        "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
        "--num-attention-heads", str(a.num_attention_heads), "--seq-length",
        str(a.seq_length), "--micro-batch-size", str(a.micro_batch_size),
        "--global-batch-size", str(a.global_batch_size), "--norm-placement", a.norm_placement,
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "4000", "--lr", "1e-3", "--clip-grad", "1.0",
        "--train-iters", str(steps_total), "--num-workers", "0", "--eval-iters", "0",
        "--log-layer-stats", "--layer-stats-file", os.path.join(folder, "stats.jsonl"),
    ] + extra)
    default_interval = args.layer_stats_interval
    log_writers.set_log_writers(args)
    model, optimizer, scheduler = setup_model_and_optimizer(pretrain_gpt.model_provider, args)
    args.iteration = args.consumed_train_samples = args.consumed_valid_samples = 0
    iterators = build_data_iterators(pretrain_gpt.train_valid_test_datasets_provider, args)
    stats_log = LayerStatsLog(args, model, model[0].module.config)
    stats_log.interval = 1  # every timed step of a "recorded" round records
    guard = UpdateGuard(args)

    def run(n, record):
        start = time.perf_counter()
        for _ in range(n):
            step = train_step(pretrain_gpt.forward_step, iterators[0], model, optimizer,
                              scheduler, args, guard, stats_log if record else None)
            args.iteration += 1
            if step.layers is not None:
                stats_log.write_step(args.iteration, step.layers, 0.0, step.grad_norm)
        return (time.perf_counter() - start) / n

    run(2, False)
    run(2, True)  # warm-up of both paths
    plain, recorded = [], []
    for _ in range(a.steps):  # alternate step by step: noise hits both alike
        plain.append(run(1, False))
        recorded.append(run(1, True))
    stats_log.close()
    t_plain, t_rec = statistics.median(plain), statistics.median(recorded)
    extra_ms = (t_rec - t_plain) * 1000
    print(f"model: {a.num_layers} layers, hidden {a.hidden_size}, seq {a.seq_length}, "
          f"global batch {a.global_batch_size}, {a.norm_placement}; medians of "
          f"{a.steps} steps of each kind, taken alternately")
    print(f"| {'what':<44} | {'ms':>9} |")
    print(f"|{'-' * 46}|{'-' * 11}|")
    print(f"| {'plain step':<44} | {t_plain * 1000:9.1f} |")
    print(f"| {'step that records the layer statistics':<44} | {t_rec * 1000:9.1f} |")
    print(f"| {'extra time of a recorded step':<44} | {extra_ms:9.1f} |")
    print()
    print(f"| {'--layer-stats-interval':<24} | {'average overhead':>17} |")
    print(f"|{'-' * 26}|{'-' * 19}|")
    worst = None
    for k in sorted({1, 10, default_interval}):
        overhead = max(t_rec - t_plain, 0.0) / k / t_plain
        if k == default_interval:
            worst = overhead
        mark = " (default)" if k == default_interval else ""
        print(f"| {str(k) + mark:<24} | {overhead * 100:16.2f}% |")
    if worst >= TARGET:
        print(f"FAILED: {worst * 100:.2f}% at the default interval (target < 5%)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
