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
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLOT_MODULE = REPO / "tools" / "plot_layer_stats.py"
PLACEMENTS = {  # label -> pretrain_gpt.py flags
    "pre": ["--norm-placement", "pre"],
    "post": ["--norm-placement", "post"],
    "mix": ["--norm-placement", "mix"],
    "peri": ["--norm-placement", "peri"],
    "peri+embnorm": ["--norm-placement", "peri", "--embedding-norm"],
}
QUICKSTART_DATA = "data/quickstart/stdlib_docs_text_document"
QUICKSTART_TOKENIZER = "data/quickstart/tok.model"
LOG_TAIL_LINES = 20
LAST_TRAIN_ITERATIONS = 20  # "final train loss" = mean lm loss of this many last iterations

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


def _read_records(path):
    """{(type, iteration): line} of a layer_stats.jsonl, the last line winning; plus the
    last "run" line under ("run", None). Unreadable lines are skipped."""
    records = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run
                if isinstance(record, dict) and "type" in record:
                    key = None if record["type"] == "run" else record.get("iteration")
                    records[(record["type"], key)] = record
    except OSError:
        pass
    return records


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


# ----------------------------------------------------------------------------- summaries

def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _growth(layer_stats, num_layers):
    """max|x| at the last layer, and last-layer / layer-1 ratios of residual max|x| and var."""
    residual = {layer["layer"]: layer.get("residual") for layer in layer_stats.get("layers", [])
                if layer.get("residual")}
    first, last = residual.get(1), residual.get(num_layers)
    if first is None or last is None:
        return None, None, None

    def ratio(key):
        a, b = last.get(key), first.get(key)
        return a / b if _finite(a) and _finite(b) and b > 0 else None
    return last.get("max_abs"), ratio("max_abs"), ratio("var")


DEPTH_POINTS = ("embedding", "layer 1", "middle", "last")


def _depth_profile(layer_stats, num_layers):
    """{point: (variance, max|x|)} of the residual stream at the embedding output, after layer
    1, the middle layer and the last layer."""
    residual = {layer["layer"]: layer.get("residual") for layer in layer_stats.get("layers", [])
                if layer.get("residual")}
    out = {}
    for point, layer in zip(DEPTH_POINTS, (0, 1, max(num_layers // 2, 1), num_layers)):
        if residual.get(layer):
            out[point] = (residual[layer].get("var"), residual[layer].get("max_abs"))
    return out


def summarize_run(run_dir):
    """One run's numbers from run_dir/{layer_stats.jsonl,result.json,log.txt}.

    diverged: a "stop" line, a null/non-finite final train loss, or NaN iterations > 0
    (diverged_reason says which). failed: a non-zero exit that is not a NaN stop, or no
    statistics at all."""
    run_dir = Path(run_dir)
    records = _read_records(run_dir / "layer_stats.jsonl")
    config = records.get(("run", None), {})
    by_type = {}
    for (kind, iteration), record in records.items():
        if kind != "run" and isinstance(iteration, int):
            by_type.setdefault(kind, []).append(record)
    train, valid, stats, stops = (sorted(by_type.get(kind, []), key=lambda r: r["iteration"])
                                  for kind in ("train", "valid", "layer_stats", "stop"))
    result = _read_json(run_dir / "result.json")
    name = run_dir.name
    last = [r.get("lm_loss") for r in train[-LAST_TRAIN_ITERATIONS:]]
    train_loss = sum(last) / len(last) if last and all(_finite(v) for v in last) else None
    nan_iterations = sum(1 for r in train if r.get("nan"))
    reasons = []
    if stops:
        reasons.append(f"stopped on NaN at iteration {stops[-1].get('iteration')}")
    if train and train_loss is None:
        reasons.append("final train loss not finite")
    if nan_iterations:
        reasons.append(f"{nan_iterations} NaN iteration{'s' * (nan_iterations > 1)}")
    code = result.get("returncode")
    failed = (code not in (None, 0) and not stops) or (not train and code is not None)
    status = ("failed" if failed else "diverged" if reasons else
              "not run" if not records and code is None else
              "unfinished" if not train or train[-1]["iteration"] < config.get(
                  "train_iters", 0) else "ok")
    max_abs, growth, var_ratio = (_growth(stats[-1], config.get("num_layers", 0)) if stats
                                  else (None, None, None))
    depth = _depth_profile(stats[-1], config.get("num_layers", 0)) if stats else {}
    label, lr, seed = _name_parts(name)
    return dict(
        name=name, label=config.get("label", label), lr=config.get("lr", lr),
        seed=config.get("seed", seed), train_loss=train_loss,
        val_loss=valid[-1].get("lm_loss") if valid else None,
        last_iteration=train[-1]["iteration"] if train else None,
        diverged=bool(reasons), diverged_reason="; ".join(reasons), failed=failed,
        status=status,
        returncode=code, seconds=result.get("seconds"), nan_iterations=nan_iterations,
        max_abs_last=max_abs, growth_max_abs=growth, growth_var=var_ratio, depth=depth,
        stats_iteration=stats[-1]["iteration"] if stats else None,
        stats_file=str(run_dir / "layer_stats.jsonl") if stats else None,
        log_tail=_log_tail(run_dir / "log.txt") if failed else "")


def _name_parts(name):
    """(label, lr, seed) from a run_name, for runs that never wrote a "run" line."""
    try:
        label, lr, seed = name.rsplit("_", 2)
        return label, float(lr[2:]), int(seed[4:])
    except ValueError:
        return name, None, None


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _log_tail(path, lines=LOG_TAIL_LINES):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log.txt)"


# ----------------------------------------------------------------------------- report

def _fmt(x, spec=".4g"):
    return format(x, spec) if _finite(x) else "—"


def usable(s):
    return not s["failed"] and not s["diverged"] and _finite(s["val_loss"])


def best_per_placement(summaries, placements):
    """{label: dict(lr, mean, spread, seeds, diverged, runs, best_run)} — best lr = lowest mean
    validation loss over the seeds among non-diverged runs; spread = half the seeds' range."""
    out = {}
    for label in placements:
        runs = [s for s in summaries if s["label"] == label]
        by_lr = {}
        for s in runs:
            if usable(s):
                by_lr.setdefault(s["lr"], []).append(s)
        best = None
        for lr, group in by_lr.items():
            vals = [s["val_loss"] for s in group]
            mean = sum(vals) / len(vals)
            if best is None or mean < best["mean"]:
                best = dict(lr=lr, mean=mean, spread=(max(vals) - min(vals)) / 2,
                            seeds=len(vals), best_run=min(group, key=lambda s: s["seed"]))
        out[label] = dict(best or {}, diverged=sum(s["diverged"] for s in runs),
                          failed=sum(s["failed"] for s in runs), runs=len(runs),
                          diverged_lrs=sorted({s["lr"] for s in runs if s["diverged"]}))
    return out


def runs_table(summaries):
    rows = ["| run | placement | lr | seed | final train loss | final val loss | diverged | "
            "max\\|x\\| last layer | growth max\\|x\\| L/1 | growth var L/1 | time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        div = (f"yes ({s['diverged_reason']})" if s["diverged"] else
               s["status"].upper() if s["status"] in ("failed", "not run", "unfinished")
               else "no")
        rows.append(f"| {s['name']} | {s['label']} | {_fmt(s['lr'], 'g')} | {s['seed']} | "
                    f"{_fmt(s['train_loss'])} | {_fmt(s['val_loss'])} | {div} | "
                    f"{_fmt(s['max_abs_last'])} | {_fmt(s['growth_max_abs'])} | "
                    f"{_fmt(s['growth_var'])} | {_fmt(s['seconds'], '.0f')} |")
    return rows


def placement_table(best, total_seeds):
    rows = ["| placement | best lr | val loss at best lr (mean ± half-range) | seeds | "
            "diverged runs | failed runs |", "|---|---|---|---|---|---|"]
    for label, b in best.items():
        loss = f"{b['mean']:.4f} ± {b['spread']:.4f}" if "mean" in b else "— (no usable run)"
        lr = _fmt(b.get("lr"), "g")
        rows.append(f"| {label} | {lr} | {loss} | {b.get('seeds', 0)}/{total_seeds} | "
                    f"{b['diverged']}/{b['runs']} | {b['failed']} |")
    return rows


def depth_table(best):
    """The residual stream across depth in each placement's best-lr run (first seed)."""
    rows = ["| placement (best lr) | " + " | ".join(
        rf"var / max\|x\| {point}" for point in DEPTH_POINTS) + " |",
        "|---|" + "---|" * len(DEPTH_POINTS)]
    for label, b in best.items():
        run = b.get("best_run")
        if not run or not run.get("depth"):
            continue
        cells = [f"{_fmt(run['depth'][p][0], '.3g')} / {_fmt(run['depth'][p][1], '.3g')}"
                 if p in run["depth"] else "—" for p in DEPTH_POINTS]
        rows.append(f"| {label} ({_fmt(b['lr'], 'g')}) | " + " | ".join(cells) + " |")
    return rows


def what_this_shows(summaries, best):
    """A few sentences computed from the numbers."""
    ranked = sorted((b["mean"], label, b["lr"]) for label, b in best.items() if "mean" in b)
    out = []
    if ranked:
        order = ", ".join(f"{label} {mean:.4f}" for mean, label, _ in ranked)
        out.append(f"Lowest best validation loss: **{ranked[0][1]}** ({ranked[0][0]:.4f} at "
                   f"lr {ranked[0][2]:g}); best validation loss by placement: {order}.")
    else:
        out.append("No placement has a finished, non-diverged run with a validation loss.")
    lrs = sorted({s["lr"] for s in summaries if _finite(s["lr"])})
    if len(lrs) > 1:
        edge = [f"{label} (lr {b['lr']:g}, the {'highest' if b['lr'] == lrs[-1] else 'lowest'})"
                for label, b in best.items() if b.get("lr") in (lrs[0], lrs[-1])]
        if edge:
            out.append("Best learning rate at the edge of the grid, so the optimum may lie "
                       f"beyond it: {', '.join(edge)}.")
    diverged = {label: b["diverged_lrs"] for label, b in best.items() if b["diverged_lrs"]}
    if diverged:
        out.append("Diverged: " + "; ".join(
            f"{label} at lr {', '.join(f'{lr:g}' for lr in lrs)}"
            for label, lrs in diverged.items()) + ".")
        stable = [label for label in best if label not in diverged]
        if stable:
            out.append(f"Never diverged: {', '.join(stable)}.")
    else:
        out.append("No run diverged at these learning rates.")
    out += _growth_sentences(summaries, best)
    failed = [s["name"] for s in summaries if s["failed"]]
    if failed:
        out.append(f"{len(failed)} run(s) failed for reasons other than NaNs: "
                   f"{', '.join(failed)} (see below).")
    return " ".join(out)


def _growth_sentences(summaries, best):
    growth = {label: b["best_run"]["growth_max_abs"] for label, b in best.items()
              if "best_run" in b and _finite(b["best_run"]["growth_max_abs"])}
    out = []
    if growth:
        ranked = sorted(growth.items(), key=lambda kv: -kv[1])
        out.append(f"Largest growth of the residual stream's max|x| from layer 1 to the last "
                   f"layer (best-lr run, first seed): **{ranked[0][0]}** (x{ranked[0][1]:.3g}); "
                   f"smallest: {ranked[-1][0]} (x{ranked[-1][1]:.3g}).")
    shares = {}
    for label, b in best.items():
        depth = b.get("best_run", {}).get("depth", {})
        if "embedding" in depth and "layer 1" in depth and _finite(depth["embedding"][0]) \
                and _finite(depth["layer 1"][0]) and depth["layer 1"][0] > 0:
            shares[label] = depth["embedding"][0] / depth["layer 1"][0]
    if shares:
        out.append("Variance of the embedding output relative to the residual stream after "
                   "layer 1 (how much of the token signal layer 1 leaves visible; best-lr run): "
                   + ", ".join(f"{label} {v:.2g}" for label, v in
                               sorted(shares.items(), key=lambda kv: -kv[1])) + ".")
    peak = [s for s in summaries if _finite(s["max_abs_last"])]
    if peak:
        top = max(peak, key=lambda s: s["max_abs_last"])
        out.append(f"The largest last-layer max|x| of any run: {top['max_abs_last']:.4g} "
                   f"({top['name']}).")
    return out


def make_report_figures(runs, out_dir, title):
    """Figures of ``runs`` ([(label, summary)]) via tools/plot_layer_stats.py.
    Returns (list of PNG paths, None) or ([], why not)."""
    runs = [(label, s) for label, s in runs if s.get("stats_file")]
    if not runs:
        return [], "no finished run has layer statistics to plot"
    try:
        spec = importlib.util.spec_from_file_location("plot_layer_stats", PLOT_MODULE)
        plot = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plot)
        loaded = plot.load_runs([s["stats_file"] for _, s in runs])
        labels = [f"{label} lr={s['lr']:g}" for label, s in runs]
        return plot.make_figures(loaded, str(out_dir), labels=labels, title=title), None
    except Exception as e:  # noqa: BLE001 - the report must still be written
        return [], f"{PLOT_MODULE.relative_to(REPO)} could not draw them ({type(e).__name__}: {e})"


def figure_sets(summaries, best):
    """(heading, subfolder, runs, title) of the report's figures: each placement's best-lr run,
    and every placement at the highest learning rate (first seed), where they differ most."""
    sets = [("Each placement at its best learning rate (first seed)", "best_lr",
             [(label, b["best_run"]) for label, b in best.items() if "best_run" in b],
             "best learning rate per placement")]
    lrs = sorted({s["lr"] for s in summaries if _finite(s["lr"]) and s["stats_file"]})
    if len(lrs) > 1:
        top = []
        for label in best:
            runs = [s for s in summaries if s["label"] == label and s["lr"] == lrs[-1]
                    and s["stats_file"]]
            if runs:
                top.append((label, min(runs, key=lambda s: s["seed"])))
        sets.append((f"Every placement at the highest learning rate, {lrs[-1]:g} (first seed)",
                     "highest_lr", top, f"every placement at lr {lrs[-1]:g}"))
    return sets


def write_report(summaries, out_path, argv=None, sizes=None, wall_seconds=None,
                 placements=None, seeds=None, figures=True):
    """Write report.md from summarize_run records; return its text."""
    out_path = Path(out_path)
    placements = placements or list(dict.fromkeys(s["label"] for s in summaries))
    best = best_per_placement(summaries, placements)
    total_seeds = len(seeds) if seeds else max([b["runs"] for b in best.values()] or [0])
    lines = ["# Peri-LN study: norm placement × learning rate × seed", ""]
    if argv is not None:
        lines += ["Made by:", "", "```", shlex.join(argv), "```", ""]
    if sizes:
        lines.append("Sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()) + ".")
    if wall_seconds is not None:
        lines.append(f"Total wall time of this command: {wall_seconds / 60:.1f} min; sum of "
                     f"run times: {sum(s['seconds'] or 0 for s in summaries) / 60:.1f} min.")
    lines += ["", "## What this shows", "", what_this_shows(summaries, best), "",
              "## Every run", "",
              f"Final train loss: mean lm loss of the last {LAST_TRAIN_ITERATIONS} iterations. "
              "Growth: residual-stream max|x| (and variance) at the last layer divided by "
              "layer 1's, at the last layer-statistics iteration.", "",
              *runs_table(summaries), "", "## Per placement", "",
              *placement_table(best, total_seeds), "",
              "## The residual stream across depth", "",
              "Variance and max|x| of the residual stream (all tokens and channels of the "
              "batch) at the last layer-statistics iteration of each placement's best-lr run "
              "(first seed): after the embedding, after layer 1, the middle and the last "
              "layer.", "", *depth_table(best), ""]
    failed = [s for s in summaries if s["failed"]]
    if failed:
        lines += ["## Failed runs", ""]
        for s in failed:
            lines += [f"### {s['name']} (exit code {s['returncode']})", "", "```",
                      s["log_tail"], "```", ""]
    lines += ["## Figures", ""]
    if figures:
        for heading, folder, runs, title in figure_sets(summaries, best):
            paths, why = make_report_figures(runs, out_path.parent / "figures" / folder, title)
            lines += [f"### {heading}", ""]
            if why:
                lines += [f"No figures: {why}.", ""]
            for path in paths:
                rel = os.path.relpath(path, out_path.parent)
                lines += [f"![{Path(path).stem}]({rel})", ""]
    else:
        lines.append("No figures (not requested).")
    text = "\n".join(lines) + "\n"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return text


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
