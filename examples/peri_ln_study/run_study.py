"""Rerun the Peri-LN paper's comparison of norm placements: pre, post, mix, peri and
peri+embnorm, each at three learning rates and two seeds, then write report.md.

    python examples/peri_ln_study/run_study.py [--output runs/peri_ln_study] [--preset cpu|gpu]
        [--placements pre,peri] [--lrs 1e-3,4e-3] [--seeds 1,2] [--train-iters N]
        [--data-path PREFIX --tokenizer-model TOK.model] [--report-only] [-- extra pretrain flags]

Each run is `torchrun pretrain_gpt.py ... --log-layer-stats` writing
<output>/runs/<name>/{log.txt,layer_stats.jsonl,result.json}. A run whose layer_stats.jsonl
already reached its last iteration (or stopped on NaNs) is not run again, so rerunning the
command resumes the study. The report is built from those files alone (summarize_run,
write_report), so it can be rebuilt with --report-only.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_report import (  # noqa: E402, F401  (the report half of the study, next to this file)
    _fmt,
    _read_records,
    best_per_placement,
    summarize_run,
    what_this_shows,
    write_report,
)

PLACEMENTS = {  # label -> pretrain_gpt.py flags
    "pre": ["--norm-placement", "pre"],
    "post": ["--norm-placement", "post"],
    "mix": ["--norm-placement", "mix"],
    "peri": ["--norm-placement", "peri"],
    "peri+embnorm": ["--norm-placement", "peri", "--embedding-norm"],
}
QUICKSTART_DATA = "data/quickstart/stdlib_docs_text_document"
QUICKSTART_TOKENIZER = "data/quickstart/tok.model"

# Sizes per preset. cpu, measured on this project's 2-core machine, OMP_NUM_THREADS=1, two runs
# at a time (8 layers x hidden 128, seq 128, micro-batch 8, global batch 16, --log-layer-stats):
#   machine otherwise idle:             ~0.5 s/iteration; a 150-iteration run 85 s (incl. ~10 s
#                                       start-up and 4 evaluations), the pair 88 s with report;
#   other jobs on the cores (load 2-6): 0.49-0.95 s/iteration, a 150-iteration run 116-136 s;
#   heavily loaded (load 8-10):         a 150-iteration run 223-228 s.
# 200 iterations: 15 pairs x ~115 s = ~29 min idle, ~40 min with moderate load (400 iterations
# would take ~55 min idle). In single-seed checks at 150 iterations no placement diverged even
# at lr 0.1 (gradient clipping at 1.0), but lr 3.2e-2 clearly stresses Pre-LN: validation loss
# 6.61 vs 6.12 at 2e-3, with residual max|x| 2.2e4 at the last layer (11 at 2e-3).
PRESETS = {
    "cpu": dict(num_layers=8, hidden_size=128, num_attention_heads=4, seq_length=128,
                micro_batch_size=8, global_batch_size=16, train_iters=200, eval_interval=50,
                eval_iters=10, layer_stats_interval=25, log_interval=10, num_workers=0,
                lrs=[1e-3, 4e-3, 1.6e-2], parallel_runs=2, nproc=1, bf16=False),
    # The Peri-LN paper's 400M setting; one run at a time on all visible GPUs.
    "gpu": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=2048,
                micro_batch_size=4, global_batch_size=256, train_iters=10000,
                eval_interval=500, eval_iters=20, layer_stats_interval=100, log_interval=10,
                num_workers=2, lrs=[1e-3, 2e-3, 4e-3], parallel_runs=1, nproc=None, bf16=True),
    # Only for the end-to-end test: seconds per run.
    "tiny": dict(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=32,
                 micro_batch_size=2, global_batch_size=4, train_iters=6, eval_interval=3,
                 eval_iters=1, layer_stats_interval=2, log_interval=1, num_workers=0,
                 lrs=[3e-3], parallel_runs=1, nproc=1, bf16=False),
}
SIZE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
             "micro_batch_size", "global_batch_size", "train_iters", "eval_interval",
             "eval_iters", "layer_stats_interval", "log_interval", "num_workers")


class StudyError(ValueError):
    """A problem with the options that the user can fix; one sentence."""


# ----------------------------------------------------------------------------- options

def _float_list(text):
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")


def _int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/peri_ln_study", help="study directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="model/batch sizes and learning rates (tiny: tests only)")
    p.add_argument("--placements", default=",".join(PLACEMENTS),
                   help=f"comma-separated, of {', '.join(PLACEMENTS)}")
    p.add_argument("--lrs", type=_float_list, help="comma-separated learning rates")
    p.add_argument("--seeds", type=_int_list, default=[1, 2], help="comma-separated seeds")
    for key in SIZE_KEYS:
        p.add_argument("--" + key.replace("_", "-"), type=int, help="override the preset")
    p.add_argument("--parallel-runs", type=int, help="runs at a time (cpu preset: 2)")
    p.add_argument("--gpus", type=int, help="processes per run (gpu preset: all visible GPUs)")
    p.add_argument("--data-path", default=QUICKSTART_DATA, help="dataset prefix (.bin/.idx)")
    p.add_argument("--tokenizer-type", default="GPTSentencePieceTokenizer")
    p.add_argument("--tokenizer-model", default=QUICKSTART_TOKENIZER)
    p.add_argument("--split", default="98,1,1")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md, train nothing")
    args = p.parse_args(argv)
    args.extra = extra
    args.argv = argv + (["--"] + extra if extra else [])
    return finish_args(args, p)


def finish_args(args, parser):
    """Fill the preset's values into args and check what the user gave."""
    preset = PRESETS[args.preset]
    for key in SIZE_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.lrs = args.lrs or preset["lrs"]
    args.parallel_runs = args.parallel_runs or preset["parallel_runs"]
    args.bf16 = preset["bf16"]
    args.placements = [x.strip() for x in args.placements.split(",") if x.strip()]
    unknown = [x for x in args.placements if x not in PLACEMENTS]
    if unknown:
        parser.error(f"--placements {','.join(unknown)} unknown; choose from "
                     f"{', '.join(PLACEMENTS)}")
    if not args.lrs or not args.seeds:
        parser.error("--lrs and --seeds each need at least one value")
    if args.preset == "gpu" and args.data_path == QUICKSTART_DATA and not args.report_only:
        parser.error("--preset gpu needs --data-path PREFIX (and --tokenizer-model): the "
                     "sample corpus is far too small for a 400M model")
    # Runs start in the repository root: make every path absolute (defaults live in the repo).
    args.output = Path(args.output).resolve()
    args.data_path = str(REPO / args.data_path) if args.data_path == QUICKSTART_DATA \
        else os.path.abspath(args.data_path)
    if args.tokenizer_model:
        args.tokenizer_model = str(REPO / args.tokenizer_model) \
            if args.tokenizer_model == QUICKSTART_TOKENIZER else os.path.abspath(
                args.tokenizer_model)
    args.nproc = args.gpus or preset["nproc"]
    if args.nproc is None and not args.report_only:
        import torch
        args.nproc = torch.cuda.device_count()
        if args.nproc == 0:
            parser.error("--preset gpu found no CUDA device; run on a GPU machine or pass "
                         "--gpus N")
    return args


# ----------------------------------------------------------------------------- running

def run_name(label, lr, seed):
    return f"{label}_lr{lr:g}_seed{seed}"


def planned_runs(args):
    """[(name, label, lr, seed)] in the order they are run: learning rate by learning rate,
    so an interrupted study has every placement at the first ones."""
    return [(run_name(label, lr, seed), label, lr, seed)
            for lr in args.lrs for seed in args.seeds for label in args.placements]


def pretrain_command(args, label, lr, seed, run_dir):
    """The torchrun command line of one run."""
    torchrun = Path(sys.executable).parent / "torchrun"
    warmup = max(1, args.train_iters // 10)
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(args.nproc),
           str(REPO / "pretrain_gpt.py"), *PLACEMENTS[label],
           "--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
           "--num-attention-heads", args.num_attention_heads,
           "--seq-length", args.seq_length, "--max-position-embeddings", args.seq_length,
           "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
           "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
           "--data-path", args.data_path, "--split", args.split,
           "--tokenizer-type", args.tokenizer_type,
           *(["--tokenizer-model", args.tokenizer_model] if args.tokenizer_model else []),
           "--micro-batch-size", args.micro_batch_size,
           "--global-batch-size", args.global_batch_size, "--train-iters", args.train_iters,
           "--lr", lr, "--min-lr", lr / 10, "--lr-decay-style", "cosine",
           "--lr-warmup-iters", warmup, "--weight-decay", "0.1", "--clip-grad", "1.0",
           "--seed", seed, "--log-interval", args.log_interval,
           "--eval-interval", args.eval_interval, "--eval-iters", args.eval_iters,
           "--num-workers", args.num_workers,
           "--log-layer-stats", "--layer-stats-interval", args.layer_stats_interval,
           "--layer-stats-file", run_dir / "layer_stats.jsonl", "--max-nan-iterations", "5"]
    if args.bf16:
        cmd.append("--bf16")
    return [str(x) for x in cmd] + list(args.extra)


def is_finished(run_dir, train_iters):
    """True when the run reached train_iters or stopped on NaNs (rerunning would repeat it)."""
    records = _read_records(Path(run_dir) / "layer_stats.jsonl")
    return ("train", train_iters) in records or any(t == "stop" for t, _ in records)


def execute_run(cmd, run_dir, env):
    """Run one training job, its output to run_dir/log.txt; write run_dir/result.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("layer_stats.jsonl", "result.json"):  # an interrupted earlier attempt
        (run_dir / stale).unlink(missing_ok=True)
    start = time.time()
    with open(run_dir / "log.txt", "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=REPO).returncode
    result = {"returncode": code, "seconds": round(time.time() - start, 1), "command": cmd}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_all(args, out_dir):
    """Train every planned run not yet finished, args.parallel_runs at a time."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if args.preset != "gpu":
        env["OMP_NUM_THREADS"] = "1"  # two single-threaded runs share two cores best
    plan = planned_runs(args)
    todo = [r for r in plan if not is_finished(out_dir / "runs" / r[0], args.train_iters)]
    if len(todo) < len(plan):
        print(f"{len(plan) - len(todo)} of {len(plan)} runs already finished; skipping them",
              flush=True)
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, args.parallel_runs)) as pool:
        futures = {}
        for name, label, lr, seed in todo:
            run_dir = out_dir / "runs" / name
            futures[pool.submit(execute_run, pretrain_command(args, label, lr, seed, run_dir),
                                run_dir, env)] = name
        try:
            for future in as_completed(futures):
                done += 1
                summary = summarize_run(out_dir / "runs" / futures[future])
                print(f"[{done}/{len(todo)}] {progress_line(summary)}", flush=True)
        except KeyboardInterrupt:  # the running jobs got the signal too; start no new ones
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def progress_line(s):
    line = (f"{s['name']}: final train loss {_fmt(s['train_loss'])}, final val loss "
            f"{_fmt(s['val_loss'])}, {_fmt(s['seconds'], '.0f')} s, diverged: "
            f"{'yes (' + s['diverged_reason'] + ')' if s['diverged'] else 'no'}")
    if s["failed"]:
        line += f" -- FAILED with exit code {s['returncode']}, see its log.txt"
    return line


# ----------------------------------------------------------------------------- main

def main(argv=None):
    start = time.time()
    args = parse_args(argv)
    out_dir = args.output
    if not args.report_only:
        for path in filter(None, (args.tokenizer_model, args.data_path + ".idx")):
            if not os.path.exists(path):
                raise SystemExit(f"error: {path} does not exist; build the sample data with "
                                 "examples/peri_ln_study/run_study.sh or pass --data-path and "
                                 "--tokenizer-model")
        total = len(planned_runs(args))
        print(f"Peri-LN study: {total} runs ({args.preset} preset, {args.parallel_runs} at a "
              f"time) into {out_dir}", flush=True)
        run_all(args, out_dir)
    summaries = [summarize_run(out_dir / "runs" / name) for name, *_ in planned_runs(args)]
    sizes = {k: getattr(args, k) for k in SIZE_KEYS}
    sizes.update(preset=args.preset, nproc_per_node=args.nproc, bf16=args.bf16,
                 lrs=",".join(f"{lr:g}" for lr in args.lrs),
                 seeds=",".join(map(str, args.seeds)))
    report = out_dir / "report.md"
    write_report(summaries, report, argv=[sys.executable, sys.argv[0], *args.argv],
                 sizes=sizes, wall_seconds=None if args.report_only else time.time() - start,
                 placements=args.placements,
                 seeds=args.seeds)
    print(f"wrote {report}", flush=True)


if __name__ == "__main__":
    main()
