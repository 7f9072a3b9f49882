"""tools/benchmark_training.py --quick runs end to end and prints every section.

Only the output's structure and the memory numbers are checked, not timings: the suite's
machines are shared 2-core boxes, and compile / recomputation may still be no-ops (their rows
then only carry a note), so nothing here depends on them doing anything.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


@pytest.fixture(scope="module")
def quick_output():
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "benchmark_training.py"),
                             "--quick"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _row(output: str, placement: str, row: str):
    pattern = rf"^\s*{placement} \| {re.escape(row)}\s*\|(.*)$"
    return re.search(pattern, output, re.MULTILINE)


def test_table_has_every_row(quick_output):
    columns = ["placement", "row", "step ms", "tokens/s", "MFU", "act MB", "state MB",
               "peak MB"]
    assert re.search(r"\s*\|\s*".join(columns), quick_output), quick_output
    rows = ["ours", "ours compiled", "ours selective", "ours full", "plain"]
    for placement, hf in (("pre", "hf llama"), ("peri", "hf glm4")):
        for row in rows + ([hf] if HAS_TRANSFORMERS else []):
            match = _row(quick_output, placement, row)
            assert match, f"no {placement} {row} row in\n{quick_output}"
            if row != "ours compiled" or "unavailable" not in match.group(1):
                step_ms = float(match.group(1).split("|")[0])
                assert step_ms > 0


def test_memory_numbers_parse(quick_output):
    # --quick: 2 layers, micro-batch 2, sequence 32, hidden 64 -> one layer input 16 KiB
    for placement in ("pre", "peri"):
        line = re.search(rf"^\s*{placement}: no recompute ({NUMBER}) MB; full recompute "
                         rf"({NUMBER}) MB, inputs only ({NUMBER}) MB, measured / expected "
                         rf"({NUMBER})$", quick_output, re.MULTILINE)
        assert line, quick_output
        eager, full, expected, ratio = (float(g) for g in line.groups())
        assert expected == pytest.approx(2 * 32 * 64 * 4 / 2 ** 20, abs=1e-3)
        assert eager > 0 and full > 0 and ratio > 0
        cells = _row(quick_output, placement, "ours").group(1).split("|")
        act, state, peak = (float(c) for c in cells[3:6])
        assert act > 0 and state > 0 and peak == pytest.approx(act + state, abs=0.11)


def test_budget_section(quick_output):
    for layout in ("TP=1, no recompute", "TP=1, dist-opt /8, full recompute",
                   "TP=2+SP, dist-opt /8, full recompute"):
        line = re.search(rf"^{re.escape(layout)}\s*\|\s*({NUMBER}) \|\s*({NUMBER}) \|\s*"
                         rf"({NUMBER}) \|\s*([0-9]+)$", quick_output, re.MULTILINE)
        assert line, f"no budget row {layout} in\n{quick_output}"
        assert int(line.group(4)) > 0
    check = re.search(rf"predicted ([0-9]+) layers, ({NUMBER}) MB predicted\n\s+built \1 "
                      rf"layers: measured ({NUMBER}) MB", quick_output)
    assert check, quick_output
    assert float(check.group(3)) > 0


def test_targets_and_ratios_are_printed(quick_output):
    assert "ratios (step time):" in quick_output
    assert re.search(r"peri / pre, eager [0-9.]+", quick_output)
    assert "targets (issue 13" in quick_output
    assert re.search(r"^(targets met|TARGET MISSED)", quick_output, re.MULTILINE)
