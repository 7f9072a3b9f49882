"""GPU checks for one NVIDIA H200 (about 6 minutes; tests/gpu/run_checks.sh runs them after
the CUDA tests). Each section prints a small table and its elapsed seconds; a summary prints
PASS/FAIL per target and the script exits 1 if one is missed (after printing everything).

    python tools/gpu_checks.py               # needs a CUDA GPU
    python tools/gpu_checks.py --cpu-smoke   # tiny shapes, fp32, on CPU: the same code paths

Sections:
  matmul rates   bf16 torch.matmul and e4m3 torch._scaled_mm (8192^3), TFLOP/s
  ~1B speed      Pre-LN and Peri-LN bf16, Peri-LN FP8 (TransformerEngine if it runs, else
                 local), ~20 iterations: MFU, Peri/Pre step, FP8/BF16 tokens/s
  ~125M loss     100 iterations of pre and peri: bf16 and FP8 (local; TE when importable):
                 final loss of FP8 against BF16, tokens/s, MFU, peak memory
  logits         local against TransformerEngine bf16 logits, same weights (when importable)
  TP=2 parity    torchrun TP=2 + sequence parallel against one process, fp32 (two GPUs)

Targets (the issue's, on one H200): BF16 MFU >= 50% for the ~1B Peri-LN model against the
measured bf16 matmul rate; Peri-LN step <= 1.03 x Pre-LN step; FP8 tokens/s >= 1.3 x BF16.
Every training run must finish, and TP=2 must match one process. With --cpu-smoke the speed
targets are printed but not gated (a CPU cannot meet them): exit 1 means the logic broke.

Training runs are pretrain_gpt.py itself with --mock-data, in subprocesses, parsed from
Megatron's log line. Its memory line comes once, after the first log line, not at the peak
of the run, so each run goes through this script's
``--launch-pretrain`` mode, which runs pretrain_gpt.py as __main__ and prints the peak memory
(torch.cuda's peak allocation; on a CPU the peak resident set) when the process exits.
MFU uses the FLOPs that --log-throughput counts (megatron/training/flops.py).
"""

import argparse
import dataclasses
import importlib.util
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BUDGET_S = 450  # the 8 minutes, less a margin for start-up and the summary
PEAK_LINE = " gpu_checks peak memory (bytes):"
TE_FLAGS = ["--transformer-impl", "transformer_engine"]


@dataclasses.dataclass
class Mode:
    """Shapes and precision of one invocation: the H200 one, or the CPU smoke one."""

    smoke: bool
    device: str
    dtype: torch.dtype  # the "bf16" runs' dtype (fp32 in smoke mode: CPU bf16 is ~100x slower)
    precision_flags: list
    small: list  # ~125M model flags
    small_iters: int
    big: list  # ~1B model flags
    big_iters: int
    tp: list  # TP parity model flags (vocabulary + EOD a multiple of 256: the padding to a
    # multiple of 128 x TP then gives both layouts the same table, hence the same weights)
    tp_iters: int
    matmul_n: int

    @property
    def base(self) -> str:
        return "fp32" if self.smoke else "bf16"


COMMON = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--log-interval", "1",
          "--eval-iters", "0", "--eval-interval", "100000", "--hidden-dropout", "0",
          "--attention-dropout", "0", "--lr-decay-style", "cosine"]


def make_mode(smoke: bool) -> Mode:
    if smoke:
        tiny = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
                "--vocab-size", "511", "--lr", "1e-3", "--lr-warmup-iters", "1",
                "--num-workers", "0"]
        return Mode(True, "cpu", torch.float32, [], tiny, 5, tiny, 5, tiny, 5, 256)
    small = ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12",
             "--seq-length", "1024", "--micro-batch-size", "8", "--global-batch-size", "8",
             "--vocab-size", "50257", "--lr", "6e-4", "--min-lr", "6e-5",
             "--lr-warmup-iters", "10", "--num-workers", "2"]
    big = ["--num-layers", "18", "--hidden-size", "2048", "--num-attention-heads", "16",
           "--ffn-hidden-size", "5632", "--swiglu", "--normalization", "RMSNorm",
           "--position-embedding-type", "rope", "--disable-bias-linear",
           "--seq-length", "2048", "--micro-batch-size", "8", "--global-batch-size", "8",
           "--vocab-size", "32000", "--lr", "3e-4", "--lr-warmup-iters", "2",
           "--num-workers", "2"]
    tp = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
          "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "4",
          "--vocab-size", "4095", "--lr", "1e-3", "--lr-warmup-iters", "2",
          "--num-workers", "0"]
    return Mode(False, "cuda", torch.bfloat16, ["--bf16"], small, 100, big, 20, tp, 20, 8192)


# ----------------------------------------------------------------------------- training runs

@dataclasses.dataclass
class Run:
    """One pretrain_gpt.py run, parsed from its log."""

    label: str
    code: int
    losses: dict  # {iteration: lm loss}
    times_ms: dict  # {iteration: elapsed time per iteration (ms)}
    padded_vocab: int
    peak_bytes: int
    last_line: str  # the last thing it printed (the error, when it failed)
    argv: list

    @property
    def ok(self) -> bool:
        return self.code == 0 and bool(self.losses)

    def step_seconds(self) -> float:
        """Median iteration time, skipping the warm-up fifth (allocator, autotuning)."""
        its = sorted(self.times_ms)
        return statistics.median(self.times_ms[i] for i in its[max(1, len(its) // 5):]) / 1e3

    def final_loss(self) -> float:
        """Mean of the last ten logged losses (one step's loss is noisy)."""
        its = sorted(self.losses)[-10:]
        return sum(self.losses[i] for i in its) / len(its)


def parse_log(lines):
    """(losses, times, padded vocab, peak bytes) from pretrain_gpt.py's output."""
    losses, times, padded, peak = {}, {}, None, None
    for line in lines:
        m = re.search(r"iteration\s+(\d+)/\s*\d+ \|.*elapsed time per iteration \(ms\): (\S+) \|"
                      r".*\| lm loss: (\S+) \|", line)
        if m:
            times[int(m.group(1))] = float(m.group(2))
            losses[int(m.group(1))] = float(m.group(3))
        m = re.search(r"padded vocab .*\(new size: (\d+)\)", line)
        if m:
            padded = int(m.group(1))
        if line.startswith(PEAK_LINE):
            peak = max(peak or 0, int(line[len(PEAK_LINE):]))
    return losses, times, padded, peak


def launch_pretrain(argv) -> None:
    """--launch-pretrain: pretrain_gpt.py as __main__, then this process's peak memory."""
    import atexit
    import runpy

    def peak():
        from megatron.training.log_writers import memory_stats
        try:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{PEAK_LINE} {memory_stats()['mem-max-allocated-bytes']}", flush=True)
        except Exception:  # noqa: BLE001 - the run's own result matters, not this line
            pass
    atexit.register(peak)
    sys.argv = [os.path.join(REPO, "pretrain_gpt.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """Runs pretrain_gpt.py under the time budget; identical runs are run once."""

    def __init__(self, deadline: float):
        self.deadline, self.cache = deadline, {}
        self.te_refusal = None  # the framework's message when it turned the TE flags down

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, label: str, argv: list, nproc: int = 1) -> Run:
        key = (tuple(argv), nproc)
        if key in self.cache:
            return dataclasses.replace(self.cache[key], label=label)
        if self.te_refusal is not None and TE_FLAGS[1] in argv:  # refused once: always
            return Run(label, 2, {}, {}, None, None, self.te_refusal, argv)
        if self.left() < 20:
            return Run(label, -1, {}, {}, None, None, "skipped: time budget spent", argv)
        me = [os.path.abspath(__file__), "--launch-pretrain", *argv]
        cmd = [sys.executable, *me] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *me]
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=self.left())
            out, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, code = e.stdout or "", -9
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
        lines = [line for line in out.splitlines() if line.strip()]
        losses, times, padded, peak = parse_log(lines)
        said = [line for line in lines if not line.startswith(PEAK_LINE)]
        result = Run(label, code, losses, times, padded, peak, said[-1] if said else "", argv)
        if result.ok:
            self.cache[key] = result
        elif TE_FLAGS[1] in argv and te_refused(result):
            self.te_refusal = result.last_line.strip()
        return result


def flops_per_iteration(run: Run) -> float:
    """The model FLOPs of one global batch as --log-throughput counts them (the TE runs'
    GEMMs are the local runs', so the local flags are used)."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.flops import model_floating_point_operations
    argv = [a for a in run.argv if a not in TE_FLAGS]
    args = parse_args(argv)
    validate_args(args, world_size=1)
    args.padded_vocab_size = run.padded_vocab or args.vocab_size
    return model_floating_point_operations(args, args.global_batch_size)


def tokens_per_second(run: Run) -> float:
    gbs = int(run.argv[run.argv.index("--global-batch-size") + 1])
    seq = int(run.argv[run.argv.index("--seq-length") + 1])
    return gbs * seq / run.step_seconds()


def run_table(runs, rates) -> None:
    """One row per run: final loss, tokens/s, MFU against each rate, peak memory."""
    names = list(rates)
    header = f"{'run':<22} | {'final loss':>10} | {'tokens/s':>10} | {'ms/step':>8} | " + \
        " | ".join(f"{'MFU@' + n:>9}" for n in names) + f" | {'peak GiB':>8}"
    print(header)
    print("-" * len(header))
    for r in runs:
        if not r.ok:
            print(f"{r.label:<22} | failed (exit {r.code}): {r.last_line[:120]}")
            continue
        flops = flops_per_iteration(r) / r.step_seconds()
        mfu = " | ".join(f"{flops / rates[n]:9.1%}" for n in names)
        peak = f"{r.peak_bytes / 2 ** 30:8.2f}" if r.peak_bytes else f"{'n/a':>8}"
        print(f"{r.label:<22} | {r.final_loss():10.4f} | {tokens_per_second(r):10.0f} | "
              f"{r.step_seconds() * 1e3:8.1f} | {mfu} | {peak}")


# ----------------------------------------------------------------------------- checks

@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    detail: str
    gated: bool = True  # a miss makes the script exit 1


def te_importable() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def te_refused(run: Run) -> bool:
    """The framework turned the TE flags down (an argument error), rather than crashing."""
    return run.code == 2 and "transformer" in run.last_line.lower()


def matmul_rates(mode: Mode) -> dict:
    """{name: FLOP/s}: bf16 (fp32 in smoke mode) matmul, and e4m3 _scaled_mm to bf16."""
    n, dev = mode.matmul_n, mode.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def rate(fn, repeats=50 if dev == "cuda" else 5):  # ~0.1 s of 8192^3 on an H200
        for _ in range(3):
            fn()
        sync()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync()
            best = min(best, (time.perf_counter() - start) / repeats)
        return 2 * n ** 3 / best

    a = torch.randn(n, n, device=dev, dtype=mode.dtype)
    b = torch.randn(n, n, device=dev, dtype=mode.dtype)
    rates = {mode.base: rate(lambda: torch.matmul(a, b))}
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(torch.float8_e4m3fn)  # row-major [n, k]: its .t() is the column-major operand
    one = torch.ones((), device=dev, dtype=torch.float32)
    rates["fp8"] = rate(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                                                 out_dtype=torch.bfloat16))
    print(f"{'matmul':<10} | {'n':>6} | {'TFLOP/s':>9}")
    print("-" * 31)
    for name, value in rates.items():
        print(f"{name:<10} | {n:6d} | {value / 1e12:9.3f}")
    return rates


def big_model_speed(mode: Mode, runner: Runner, rates: dict, checks: list) -> None:
    """~1B Pre-LN and Peri-LN at the base precision, and Peri-LN in FP8."""
    argv = COMMON + mode.big + mode.precision_flags + ["--train-iters", str(mode.big_iters)]
    fp8 = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"]
    runs = {p: runner.run(f"{p} {mode.base}", argv + ["--norm-placement", p])
            for p in ("pre", "peri")}
    fp8_run = None
    if te_importable():
        fp8_run = runner.run("peri fp8 TE", argv + fp8 + TE_FLAGS + ["--norm-placement", "peri"])
        if te_refused(fp8_run):
            print(f"TE run refused: {runner.te_refusal}; FP8 through the local path")
            fp8_run = None
    if fp8_run is None:
        fp8_run = runner.run("peri fp8 local", argv + fp8 + ["--norm-placement", "peri"])
    run_table([runs["pre"], runs["peri"], fp8_run], rates)
    checks.append(Check("~1B runs finished", all(r.ok for r in (*runs.values(), fp8_run)),
                        ", ".join(f"{r.label}: exit {r.code}"
                                  for r in (*runs.values(), fp8_run))))
    speed = not mode.smoke
    if runs["peri"].ok:
        mfu = flops_per_iteration(runs["peri"]) / runs["peri"].step_seconds() / rates[mode.base]
        checks.append(Check(f"{mode.base} MFU >= 50% (~1B Peri-LN)", mfu >= 0.5,
                            f"{mfu:.1%}", speed))
    if runs["pre"].ok and runs["peri"].ok:
        ratio = runs["peri"].step_seconds() / runs["pre"].step_seconds()
        checks.append(Check("Peri-LN step <= 1.03 x Pre-LN", ratio <= 1.03, f"{ratio:.3f}",
                            speed))
    if runs["peri"].ok and fp8_run.ok:
        ratio = tokens_per_second(fp8_run) / tokens_per_second(runs["peri"])
        checks.append(Check(f"FP8 tokens/s >= 1.3 x {mode.base} ({fp8_run.label})",
                            ratio >= 1.3, f"{ratio:.2f}x", speed))


def small_model_losses(mode: Mode, runner: Runner, rates: dict, checks: list) -> None:
    """~125M, pre and peri: base precision, FP8 local, and TE base and FP8 when importable."""
    argv = COMMON + mode.small + mode.precision_flags + ["--train-iters", str(mode.small_iters)]
    fp8 = ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"]
    variants = {mode.base: [], "fp8 local": fp8}
    if te_importable():
        variants.update({f"{mode.base} TE": TE_FLAGS, "fp8 TE": fp8 + TE_FLAGS})
    runs = {}
    for p in ("pre", "peri"):
        for name, flags in variants.items():
            runs[(p, name)] = runner.run(f"{p} {name}", argv + flags + ["--norm-placement", p])
    run_table(list(runs.values()), rates)
    print(f"{'placement':<9} | {'run':<12} | {'final loss':>10} | {'vs ' + mode.base:>10} | "
          f"{'max rel gap':>11}")
    print("-" * 64)
    for (p, name), r in runs.items():
        ref = runs[(p, mode.base)]
        if name == mode.base or not (r.ok and ref.ok):
            continue
        gap = max(abs(r.losses[i] - ref.losses[i]) / ref.losses[i]
                  for i in ref.losses if i in r.losses)
        print(f"{p:<9} | {name:<12} | {r.final_loss():10.4f} | "
              f"{r.final_loss() - ref.final_loss():+10.4f} | {gap:11.2e}")
    refused = [r for r in runs.values() if TE_FLAGS[1] in r.argv and te_refused(r)]
    failed = [r for r in runs.values() if not r.ok and r not in refused]
    if refused:
        print(f"TE runs refused by the framework: {runner.te_refusal}")
    checks.append(Check("~125M runs finished", not failed,
                        ", ".join(f"{r.label}: exit {r.code}" for r in failed) or
                        f"{len(runs) - len(refused)} runs"))


def logits_difference(mode: Mode, checks: list) -> None:
    """The same weights in the local and the TransformerEngine model: logits side by side
    (smoke mode: local against local, through the same name mapping)."""
    other = "local" if mode.smoke else "transformer_engine"
    if other != "local" and not te_importable():
        print("skipped: transformer_engine is not importable")
        return
    try:
        rows = [_logits_gap(mode, p, other) for p in ("pre", "peri")]
    except Exception as e:  # noqa: BLE001 - an API that differs must not stop the script
        print(f"skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return
    print(f"{'placement':<9} | {'impl':<18} | {'max |diff|':>10} | {'max |logit|':>11} | "
          f"{'rel':>9}")
    print("-" * 70)
    for p, diff, scale in rows:
        print(f"{p:<9} | {other:<18} | {diff:10.3e} | {scale:11.3e} | {diff / scale:9.2e}")
    # bf16 kernels differ in their rounding (~1e-2 of the logits' size); a wrong weight
    # mapping gives differences as large as the logits themselves
    worst = max(diff / scale for _, diff, scale in rows)
    checks.append(Check(f"local vs {other} logits", worst <= 0.1, f"rel {worst:.2e}"))


def _logits_gap(mode: Mode, placement: str, other: str):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import set_random_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.training.megatron_lm_checkpoint import our_name
    seq, vocab = 128, 1024
    config = TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=4,
                               norm_placement=placement, hidden_dropout=0.0,
                               attention_dropout=0.0, max_position_embeddings=seq,
                               params_dtype=mode.dtype)
    set_random_seed(0)
    local = GPTModel(config, vocab).to(mode.device).eval()
    if other == "local":
        twin = GPTModel(config, vocab).to(mode.device).eval()
    else:
        twin = GPTModel(dataclasses.replace(config, transformer_impl=other),
                        vocab).to(mode.device).eval()
    ours = local.state_dict()
    unmapped = []
    with torch.no_grad():
        for key, tensor in twin.state_dict().items():
            name = our_name(key)
            if name is None:
                continue
            if name not in ours:
                unmapped.append(key)
                continue
            tensor.copy_(ours[name])
    if unmapped:
        raise KeyError(f"{len(unmapped)} entries have no local name, e.g. {unmapped[0]}")
    tokens = torch.randint(0, vocab, (2, seq), device=mode.device)
    positions = torch.arange(seq, device=mode.device).expand(2, seq)
    with torch.no_grad():
        a, b = local(tokens, positions).float(), twin(tokens, positions).float()
    return placement, (a - b).abs().max().item(), a.abs().max().item()


def tp_parity(mode: Mode, runner: Runner, checks: list) -> None:
    """torchrun TP=2 with sequence parallelism against one process, fp32."""
    if not mode.smoke and torch.cuda.device_count() < 2:
        print(f"skipped: {torch.cuda.device_count()} GPU(s); TP=2 needs two")
        return
    # (in smoke mode the one-process run is the ~1B section's Pre-LN run, already done)
    argv = COMMON + mode.tp + ["--train-iters", str(mode.tp_iters), "--norm-placement", "pre"]
    one = runner.run("TP=1", argv)
    two = runner.run("TP=2 + SP", argv + ["--tensor-model-parallel-size", "2",
                                          "--sequence-parallel"], nproc=2)
    print(f"{'run':<10} | {'exit':>4} | {'iterations':>10} | {'first loss':>10} | "
          f"{'last loss':>10}")
    print("-" * 56)
    for r in (one, two):
        its = sorted(r.losses)
        first, last = (f"{r.losses[its[i]]:10.4f}" if its else f"{'-':>10}" for i in (0, -1))
        print(f"{r.label:<10} | {r.code:4d} | {len(its):10d} | {first} | {last}")
    if not (one.ok and two.ok) or sorted(one.losses) != sorted(two.losses):
        checks.append(Check("TP=2 parity", False, f"exit {one.code} / {two.code}, "
                            f"{len(one.losses)} / {len(two.losses)} iterations"))
        return
    # fp32 sums split over two ranks round differently; 20 Adam steps grow those ulps to
    # ~1e-6 on a CPU, and GPU kernels add their own reduction orders: 1e-3 leaves room for
    # nothing else
    gap = max(abs(one.losses[i] - two.losses[i]) / abs(one.losses[i]) for i in one.losses)
    checks.append(Check("TP=2 parity (max rel loss gap <= 1e-3)", gap <= 1e-3, f"{gap:.2e}"))


# ----------------------------------------------------------------------------- main

def section(title: str, fn, *args) -> None:
    print(f"\n=== {title} ===", flush=True)
    start = time.time()
    fn(*args)
    print(f"[{title}: {time.time() - start:.1f} s]", flush=True)


def summary(checks: list) -> int:
    print("\n=== summary ===")
    for c in checks:
        verdict = ("PASS" if c.passed else "FAIL") if c.gated else \
            ("pass" if c.passed else "miss") + " (not gated)"
        print(f"{verdict:<18} {c.name}: {c.detail}")
    failed = [c for c in checks if c.gated and not c.passed]
    print("ALL PASS" if not failed else f"FAILED: {len(failed)} check(s)")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes, fp32, on CPU: exercise the script's logic")
    a = p.parse_args(argv)
    if not a.cpu_smoke and not torch.cuda.is_available():
        print("gpu_checks.py needs a CUDA GPU; run it on one, or pass --cpu-smoke to exercise "
              "its logic on tiny shapes on a CPU.", file=sys.stderr)
        return 2
    mode = make_mode(a.cpu_smoke)
    start = time.time()
    runner = Runner(start + BUDGET_S)
    where = torch.cuda.get_device_name() if mode.device == "cuda" else "CPU (smoke)"
    print(f"gpu_checks on {where}; torch {torch.__version__}; transformer_engine "
          f"{'importable' if te_importable() else 'not importable'}")
    checks, rates = [], {}
    section("matmul rates", lambda: rates.update(matmul_rates(mode)))
    section("~1B speed (Pre-LN, Peri-LN, FP8)", big_model_speed, mode, runner, rates, checks)
    section("~125M loss: FP8 vs " + mode.base, small_model_losses, mode, runner, rates, checks)
    section("local vs TE logits", logits_difference, mode, checks)
    section("TP=2 parity", tp_parity, mode, runner, checks)
    print(f"\ntotal: {time.time() - start:.1f} s (budget {BUDGET_S} s)")
    return summary(checks)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--launch-pretrain":
        launch_pretrain(sys.argv[2:])
    else:
        sys.exit(main())
