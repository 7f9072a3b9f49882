"""Plot per-layer statistics (layer_stats.jsonl, from pretrain_gpt.py --log-layer-stats) as PNGs.

    python tools/plot_layer_stats.py RUN.jsonl [MORE.jsonl ...] --output OUT_DIR
        [--iterations 100,400] [--labels L1,L2,...] [--align-by-depth-fraction] [--title TEXT]

Writes into OUT_DIR:
  activations.png  residual-stream variance and max|x| per layer, against the fp16/fp8 limits
  sublayers.png    attention/MLP outputs (and peri's normed outputs) per layer, per run
  grad_norms.png   gradient norm per layer (0 = embedding, num_layers + 1 = output layer)
  curves.png       training loss (validation points marked) and grad norm against iteration
  gains.png        mean +- std of every norm's gain per layer, per run

Each run shows its first, middle and last stats iteration unless --iterations says otherwise; an
iteration a run lacks falls back to its nearest earlier one (said on stderr). Runs with
different num_layers need --align-by-depth-fraction (x = layer / num_layers).

Importable: load_run(path), load_runs(paths), make_figures(runs, out_dir, ...), main(argv).
"""

import argparse
import json
import math
import os
import sys
from collections import Counter

RUN_TYPES = ("train", "valid", "layer_stats", "stop")
# (label, value, colour) of the number formats whose overflow the max|x| panel shows.
# Greys, so they never look like one of the runs' colours.
FORMAT_LIMITS = (("fp16 max 65504", 65504.0, "0.1"),
                 ("fp8 e5m2 max 57344", 57344.0, "0.45"),
                 ("fp8 e4m3 max 448", 448.0, "0.3"))
BF16_NOTE = "bf16 max 3.39e38 (off scale, not drawn)"
LINE_STYLES = ("-", "--", ":", "-.")  # the last (latest) iteration is solid
SUBLAYERS = ("attention", "mlp", "attention_normed", "mlp_normed")


class LayerStatsError(ValueError):
    """A problem with the input files or options that the user can fix; one sentence."""


def load_run(path):
    """Read one layer_stats.jsonl; for each (type, iteration) the last line wins.

    Returns {"path", "config": the last "run" line, "train", "valid", "layer_stats", "stop"},
    the last four mapping iteration -> line. Raises LayerStatsError on bad input."""
    if not os.path.exists(path):
        raise LayerStatsError(f"{path} does not exist")
    run = {"path": path, "config": None, **{kind: {} for kind in RUN_TYPES}}
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LayerStatsError(f"{path} line {number} is not valid JSON ({e.msg}); "
                                          "expected one JSON object per line") from None
                if not isinstance(record, dict) or not isinstance(record.get("iteration", 0), int):
                    raise LayerStatsError(f"{path} line {number} is not a JSON object with an "
                                          "integer \"iteration\"")
                if record.get("type") == "run":
                    run["config"] = record
                elif record.get("type") in RUN_TYPES:
                    run[record["type"]][record.get("iteration", 0)] = record
    except UnicodeDecodeError:
        raise LayerStatsError(f"{path} is not a text file of JSON lines") from None
    except OSError as e:
        raise LayerStatsError(f"{path} cannot be read ({e.strerror})") from None
    if run["config"] is None or not run["layer_stats"]:
        raise LayerStatsError(f"{path} is not a layer-statistics file written by "
                              "--log-layer-stats")
    num_layers = run["config"].get("num_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise LayerStatsError(f"{path} has \"num_layers\": {num_layers!r} in its \"run\" line; "
                              "expected a positive integer")
    for iteration, record in run["layer_stats"].items():
        layers = record.get("layers")
        if not isinstance(layers, list) or not all(isinstance(layer, dict) and isinstance(
                layer.get("layer"), int) for layer in layers):
            raise LayerStatsError(f"{path}: the \"layer_stats\" line of iteration {iteration} "
                                  "has no \"layers\" list of objects with an integer \"layer\"")
    return run


def load_runs(paths):
    """load_run for every path, in order."""
    return [load_run(path) for path in paths]


def run_labels(runs, labels=None):
    """One label per run: the given ones, else each run's "label", told apart by lr, then seed,
    then file path."""
    if labels is not None:
        if len(labels) != len(runs):
            raise LayerStatsError(f"--labels gives {len(labels)} labels for {len(runs)} files; "
                                  "give exactly one per file, separated by commas")
        return [str(label) for label in labels]
    out = [str(r["config"].get("label") or r["config"].get("placement") or "run") for r in runs]
    for key in ("lr", "seed", "path"):  # the path only when lr and seed are the same too
        counts = Counter(out)
        out = [label if counts[label] == 1 else f"{label} ({r['path']})" if key == "path"
               else f"{label} {key}={r['config'].get(key)}" for label, r in zip(out, runs)]
    return out


def choose_iterations(run, label, requested=None):
    """The stats iterations to show for one run (sorted); a missing one falls back to the
    nearest earlier stats iteration, with a note on stderr."""
    available = sorted(run["layer_stats"])
    if not requested:
        return sorted({available[0], available[len(available) // 2], available[-1]})
    chosen = set()
    for iteration in requested:
        earlier = [a for a in available if a <= iteration]
        use = earlier[-1] if earlier else available[0]
        if use != iteration:
            which = "nearest earlier" if earlier else "first"
            print(f"note: {label} ({run['path']}) has no layer stats at iteration {iteration}; "
                  f"showing its {which} stats iteration {use} instead", file=sys.stderr)
        chosen.add(use)
    return sorted(chosen)


def _number(value, positive):
    """True for a finite number (and > 0 when it goes on a log axis)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and (value > 0 or not positive))


def _per_layer(view, iteration, *keys, positive=True):
    """(x, y) of layers[...][keys[0]][keys[1]]... at one iteration, skipping absent values."""
    xs, ys = [], []
    for layer in view["run"]["layer_stats"][iteration]["layers"]:
        value = layer
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if _number(value, positive):
            xs.append(layer["layer"] * view["x_scale"])
            ys.append(value)
    return xs, ys


def _line(view, iteration):
    """Colour per run, line style per iteration (latest solid)."""
    from_end = len(view["iterations"]) - 1 - view["iterations"].index(iteration)
    return dict(color=view["color"], ls=LINE_STYLES[min(from_end, len(LINE_STYLES) - 1)],
                marker=".", label=f"{view['label']} @ {iteration}")


def _plot_activations(fig, views, xlabel):
    ax_var, ax_max = fig.subplots(1, 2)
    for view in views:
        for iteration in view["iterations"]:
            ax_var.plot(*_per_layer(view, iteration, "residual", "var"), **_line(view, iteration))
            ax_max.plot(*_per_layer(view, iteration, "residual", "max_abs"),
                        **_line(view, iteration))
    # fp16 and e5m2 are close on a log axis: label one above its line on the left, one below
    # on the right.
    for (name, limit, color), x, ha, va in zip(FORMAT_LIMITS, (0.01, 0.99, 0.01),
                                               ("left", "right", "left"),
                                               ("bottom", "top", "bottom")):
        ax_max.axhline(limit, ls="--", lw=1, color=color, label=name)
        ax_max.text(x, limit, name, color=color, fontsize=7, ha=ha, va=va,
                    transform=ax_max.get_yaxis_transform())
    ax_max.plot([], [], ls="none", label=BF16_NOTE)
    ax_var.set(title="residual-stream variance", yscale="log", xlabel=xlabel)
    ax_max.set(title="residual-stream max |x|", yscale="log", xlabel=xlabel)
    fig.legend(*ax_max.get_legend_handles_labels(), loc="outside right upper", fontsize=8)


def _plot_sublayers(fig, views, xlabel):
    axes = fig.subplots(len(views), 2, squeeze=False)
    for view, (ax_max, ax_var) in zip(views, axes):
        iteration = view["iterations"][-1]
        for ax, field in ((ax_max, "max_abs"), (ax_var, "var")):
            ax.plot(*_per_layer(view, iteration, "residual", field), color="0.6", lw=1,
                    label="residual stream")
            for i, name in enumerate(SUBLAYERS):
                xs, ys = _per_layer(view, iteration, name, field)
                if xs:
                    ax.plot(xs, ys, color=f"C{i % 2}", ls="--" if i > 1 else "-",
                            marker=".", label=name)
            ax.set(yscale="log", xlabel=xlabel,
                   title=f"{view['label']} @ {iteration}: sublayer output "
                         f"{'max |x|' if field == 'max_abs' else 'variance'}")
        ax_max.legend(fontsize=7)


def _plot_grad_norms(fig, views, xlabel):
    ax = fig.subplots()
    for view in views:
        for iteration in view["iterations"]:
            ax.plot(*_per_layer(view, iteration, "grad_norm"), **_line(view, iteration))
    ax.set(title="gradient norm per layer", yscale="log",
           xlabel=f"{xlabel} (0 = embedding, last = final norm + output layer)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8)


def _plot_curves(fig, views):
    ax_loss, ax_grad = fig.subplots(1, 2)
    for view in views:
        run, color, label = view["run"], view["color"], view["label"]
        for ax, key, kind, positive in ((ax_loss, "lm_loss", "train", False),
                                        (ax_grad, "grad_norm", "train", True),
                                        (ax_loss, "lm_loss", "valid", False)):
            points = [(i, r.get(key)) for i, r in sorted(run[kind].items())
                      if _number(r.get(key), positive)]
            xs, ys = zip(*points) if points else ((), ())
            if kind == "train":
                ax.plot(xs, ys, color=color, lw=1, label=f"{label} train")
            else:
                ax.plot(xs, ys, "o", color=color, mec="k", ms=5, label=f"{label} valid")
        for iteration, stop in run["stop"].items():
            for ax in (ax_loss, ax_grad):
                ax.axvline(iteration, color=color, ls=":",
                           label=f"{label} stopped ({stop.get('reason', '?')})")
    ax_loss.set(title="lm loss", xlabel="iteration")
    ax_grad.set(title="grad norm", xlabel="iteration", yscale="log")
    ax_loss.legend(fontsize=8)
    ax_grad.legend(fontsize=8)


def _plot_gains(fig, views, xlabel):
    names = list(dict.fromkeys(name for view in views for layer in
                               view["run"]["layer_stats"][view["iterations"][-1]]["layers"]
                               for name in (layer.get("norms") or {})))
    ncols = min(len(views), 3)
    axes = fig.subplots(math.ceil(len(views) / ncols), ncols, squeeze=False, sharey=True)
    for ax in axes.flat[len(views):]:
        ax.set_visible(False)
    for view, ax in zip(views, axes.flat):
        iteration = view["iterations"][-1]
        for i, name in enumerate(names):
            xs, means = _per_layer(view, iteration, "norms", name, "mean", positive=False)
            if not xs:
                continue
            _, stds = _per_layer(view, iteration, "norms", name, "std", positive=False)
            ax.errorbar(xs, means, yerr=stds if len(stds) == len(means) else None,
                        color=f"C{i}", marker=".", capsize=3, label=name)
        ax.set(title=f"{view['label']} @ {iteration}: norm gain (mean ± std)", xlabel=xlabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # e.g. a synthetic run without gains
            ax.text(0.5, 0.5, "no norm gains recorded", ha="center", transform=ax.transAxes)


def make_figures(runs, out_dir, iterations=None, labels=None, align_by_depth_fraction=False,
                 title=None):
    """Draw the five PNGs of the module docstring for runs (from load_run) into out_dir.

    iterations: stats iterations to show (default: each run's first, middle and last);
    labels: one per run (default: see run_labels). Returns the paths written, in order."""
    if not runs:
        raise LayerStatsError("no runs to plot; give at least one layer_stats.jsonl")
    if iterations is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in iterations):
        raise LayerStatsError(f"--iterations must be positive integers, got {list(iterations)}")
    first = runs[0]
    for run in runs[1:]:
        if run["config"]["num_layers"] != first["config"]["num_layers"] \
                and not align_by_depth_fraction:
            raise LayerStatsError(
                f"{first['path']} has {first['config']['num_layers']} layers but {run['path']} "
                f"has {run['config']['num_layers']}; pass --align-by-depth-fraction to plot "
                "them against layer / num_layers")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise LayerStatsError("plotting needs matplotlib; install it with "
                              "pip install -e .[plot]") from None
    views = []
    for i, (run, label) in enumerate(zip(runs, run_labels(runs, labels))):
        views.append(dict(run=run, label=label, color=f"C{i % 10}",
                          iterations=choose_iterations(run, label, iterations),
                          x_scale=1 / run["config"]["num_layers"] if align_by_depth_fraction
                          else 1))
    xlabel = "layer / num_layers" if align_by_depth_fraction else "layer"
    figures = {
        "activations": ((13, 5), lambda fig: _plot_activations(fig, views, xlabel)),
        "sublayers": ((12, 3.6 * len(views)), lambda fig: _plot_sublayers(fig, views, xlabel)),
        "grad_norms": ((10, 5), lambda fig: _plot_grad_norms(fig, views, xlabel)),
        "curves": ((13, 5), lambda fig: _plot_curves(fig, views)),
        "gains": ((6 * min(len(views), 3), 4.5 * math.ceil(len(views) / 3)),
                  lambda fig: _plot_gains(fig, views, xlabel)),
    }
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise LayerStatsError(f"cannot create the output directory {out_dir} "
                              f"({e.strerror})") from None
    written = []
    for name, (size, draw) in figures.items():
        # A bare Figure on an Agg canvas: no pyplot state, never needs a display.
        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig)
        if not align_by_depth_fraction and name not in ("curves",):
            for ax in fig.axes:  # layers are whole numbers
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title:
            fig.suptitle(title)
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def parse_iterations(text):
    """'100,400' -> [100, 400]; LayerStatsError unless all are positive integers."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise LayerStatsError(f"--iterations {text!r} is not a comma-separated list of positive "
                              "integers, e.g. --iterations 100,400")
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("files", nargs="+", metavar="RUN.jsonl", help="layer_stats.jsonl files")
    p.add_argument("--output", required=True, metavar="OUT_DIR", help="directory for the PNGs")
    p.add_argument("--iterations", help="stats iterations to show, e.g. 100,400 "
                   "(default: first, middle and last of each run)")
    p.add_argument("--labels", help="one label per file, separated by commas")
    p.add_argument("--align-by-depth-fraction", action="store_true",
                   help="allow different num_layers: x axis becomes layer / num_layers")
    p.add_argument("--title", help="title drawn above every figure")
    args = p.parse_args(argv)
    try:
        iterations = parse_iterations(args.iterations) if args.iterations is not None else None
        runs = load_runs(args.files)
        labels = args.labels.split(",") if args.labels is not None else None
        written = make_figures(runs, args.output, iterations, labels,
                               args.align_by_depth_fraction, args.title)
    except LayerStatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
