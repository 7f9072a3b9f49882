"""The Peri-LN study's report: per-run summaries from the files each run leaves
(<run>/layer_stats.jsonl, result.json, log.txt) and report.md with its tables, figures and
computed conclusions. Used by run_study.py; works on finished runs alone (--report-only).
"""

import importlib.util
import json
import math
import os
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLOT_MODULE = REPO / "tools" / "plot_layer_stats.py"
LOG_TAIL_LINES = 20
LAST_TRAIN_ITERATIONS = 20  # "final train loss" = mean lm loss of this many last iterations


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
    validation loss over the seeds, among the learning rates at which every seed finished
    without diverging (one diverged seed rules a learning rate out); spread = half the seeds'
    range."""
    out = {}
    for label in placements:
        runs = [s for s in summaries if s["label"] == label]
        by_lr = {}
        for s in runs:
            by_lr.setdefault(s["lr"], []).append(s)
        best = None
        for lr, group in by_lr.items():
            if not all(usable(s) for s in group):
                continue
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
