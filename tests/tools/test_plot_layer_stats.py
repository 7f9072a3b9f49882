"""plot_layer_stats.py: five PNGs from synthetic layer_stats.jsonl files; one "error: ..." line
and exit status 1 for every bad input."""

import json

import pytest

pytest.importorskip("matplotlib")

from plot_layer_stats import LayerStatsError, load_run, main, make_figures  # noqa: E402

FIGURES = ("activations", "sublayers", "grad_norms", "curves", "gains")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stats(scale):
    return {"mean": 0.0, "var": scale ** 2, "rms": scale, "max_abs": 8 * scale}


def layer_stats_line(iteration, placement, num_layers):
    """pre: max|x| grows with depth and training; peri: flat."""
    growth = 1.0 + iteration / 100 if placement == "pre" else 1.0
    layers = [{"layer": 0, "kind": "embedding", "residual": stats(0.01), "grad_norm": 0.3,
               "norms": {}}]
    for n in range(1, num_layers + 1):
        scale = 0.01 * growth ** n if placement == "pre" else 0.5
        layer = {"layer": n, "kind": placement, "residual": stats(scale),
                 "attention": stats(scale / 2), "mlp": stats(scale), "grad_norm": 0.1 / n,
                 "norms": {"input_layernorm": {"mean": 1.0 + 0.01 * n, "std": 0.02},
                           "pre_mlp_layernorm": {"mean": 0.9, "std": 0.05}}}
        if placement == "peri":
            layer.update(attention_normed=stats(0.3), mlp_normed=stats(0.3))
            layer["norms"].update(post_self_attn_layernorm={"mean": 0.5, "std": 0.1},
                                  post_mlp_layernorm={"mean": 0.4, "std": 0.1})
        layers.append(layer)
    layers.append({"layer": num_layers + 1, "kind": "output", "grad_norm": 0.5,
                   "norms": {"final_layernorm": {"mean": 1.1, "std": 0.03}}})
    return {"type": "layer_stats", "iteration": iteration, "lm_loss": 6.0, "grad_norm": 0.8,
            "layers": layers}


def run_lines(placement="peri", num_layers=4, iters=200, interval=50, lr=0.003, seed=1234):
    lines = [{"type": "run", "version": 1, "iteration": 0, "placement": placement,
              "num_layers": num_layers, "lr": lr, "seed": seed, "layer_stats_interval": interval,
              "label": placement}]
    for it in range(1, iters + 1):
        lines.append({"type": "train", "iteration": it, "lm_loss": None if it == 3 else 8 - it / 50,
                      "grad_norm": None if it == 5 else 1.0 / it, "lr": lr, "skipped": 0,
                      "nan": 0, "spike": 0})
        if it % 100 == 0:
            lines.append({"type": "valid", "iteration": it, "lm_loss": 7.5 - it / 50})
        if it % interval == 0:
            lines.append(layer_stats_line(it, placement, num_layers))
    return lines


def write(path, lines, blank_lines=True):
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + ("\n\n" if blank_lines else "\n"))
    return str(path)


def run_main(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_pngs(out_dir, printed):
    for name in FIGURES:
        path = out_dir / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert str(path) in printed
    assert len(printed.splitlines()) == len(FIGURES)


def test_one_run(tmp_path, capsys):
    peri = write(tmp_path / "peri.jsonl", run_lines("peri"))
    out = tmp_path / "plots" / "one"
    code, printed, err = run_main([peri, "--output", str(out), "--title", "one run"], capsys)
    assert code == 0, err
    assert_pngs(out, printed)


def test_two_runs_and_missing_iteration(tmp_path, capsys):
    pre = write(tmp_path / "pre.jsonl", run_lines("pre", iters=150))  # stopped early
    peri = write(tmp_path / "peri.jsonl", run_lines("peri"))
    code, printed, err = run_main([pre, peri, "--output", str(tmp_path / "two"),
                                   "--iterations", "50,200", "--labels", "Pre-LN,Peri-LN"],
                                  capsys)
    assert code == 0, err
    assert_pngs(tmp_path / "two", printed)
    notes = err.strip().splitlines()
    assert len(notes) == 1 and "200" in notes[0] and "150" in notes[0], err


def test_last_line_wins_and_last_run_line(tmp_path):
    lines = run_lines("peri", iters=100)
    resumed = run_lines("peri", iters=100, lr=0.001)
    resumed[0]["iteration"] = 50
    resumed[-1]["layers"][1]["residual"]["max_abs"] = 123.0
    path = write(tmp_path / "resumed.jsonl", lines + resumed)
    run = load_run(path)
    assert run["config"]["lr"] == 0.001
    assert sorted(run["layer_stats"]) == [50, 100]
    assert run["layer_stats"][100]["layers"][1]["residual"]["max_abs"] == 123.0
    assert len(run["train"]) == 100


def test_same_labels_told_apart(tmp_path):
    a = load_run(write(tmp_path / "a.jsonl", run_lines("pre", iters=50, lr=0.003)))
    b = load_run(write(tmp_path / "b.jsonl", run_lines("pre", iters=50, lr=0.001)))
    c = load_run(write(tmp_path / "c.jsonl", run_lines("pre", iters=50, lr=0.001, seed=7)))
    from plot_layer_stats import run_labels
    assert run_labels([a, b, c]) == ["pre lr=0.003", "pre lr=0.001 seed=1234",
                                     "pre lr=0.001 seed=7"]


def test_different_layer_counts_need_alignment(tmp_path, capsys):
    small = write(tmp_path / "small.jsonl", run_lines("pre", num_layers=4, iters=100))
    large = write(tmp_path / "large.jsonl", run_lines("peri", num_layers=8, iters=100))
    code, _, err = run_main([small, large, "--output", str(tmp_path / "x")], capsys)
    assert code == 1
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "4" in err and "8" in err and "--align-by-depth-fraction" in err
    out = tmp_path / "aligned"
    code, printed, err = run_main([small, large, "--output", str(out),
                                   "--align-by-depth-fraction"], capsys)
    assert code == 0, err
    assert_pngs(out, printed)


@pytest.mark.parametrize("case", ["missing", "not_json", "no_run", "no_layer_stats",
                                  "labels", "iterations_text", "iterations_zero"])
def test_bad_input(tmp_path, capsys, case):
    good = write(tmp_path / "good.jsonl", run_lines("peri", iters=50))
    files, extra, expect = [good], [], "good.jsonl"
    if case == "missing":
        files, expect = [str(tmp_path / "absent.jsonl")], "absent.jsonl does not exist"
    elif case == "not_json":
        lines = run_lines("peri", iters=50)
        files = [write(tmp_path / "bad.jsonl", lines[:2] + ["{not json"] + lines[2:])]
        expect = "bad.jsonl line 3"
    elif case in ("no_run", "no_layer_stats"):
        kind = "run" if case == "no_run" else "layer_stats"
        lines = [line for line in run_lines("peri", iters=50) if line["type"] != kind]
        files = [write(tmp_path / "partial.jsonl", lines)]
        expect = "is not a layer-statistics file written by --log-layer-stats"
    elif case == "labels":
        extra, expect = ["--labels", "a,b"], "--labels"
    else:
        value = "100,soon" if case == "iterations_text" else "0,100"
        extra, expect = ["--iterations", value], "--iterations"
    code, printed, err = run_main([*files, *extra, "--output", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expect in err and "Traceback" not in err
    assert printed == ""


def test_make_figures_raises_for_bad_iterations(tmp_path):
    run = load_run(write(tmp_path / "r.jsonl", run_lines("pre", iters=50)))
    with pytest.raises(LayerStatsError, match="positive integers"):
        make_figures([run], str(tmp_path / "out"), iterations=[-1])
