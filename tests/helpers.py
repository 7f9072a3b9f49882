"""Test helpers: run a function on N gloo processes; run pretrain in-process; parse logs."""

import contextlib
import io
import os
import pickle
import re
import socket
import sys
import tempfile
import traceback

import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    import torch
    torch.set_num_threads(1)  # as torchrun does: N processes share the machine's cores
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        result = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    import torch.distributed as dist
    if dist.is_initialized():  # a live gloo group at interpreter exit can abort the process
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    """Run ``fn(*args)`` on ``world_size`` spawned processes with torchrun's environment
    variables set (gloo, a free port); return the per-rank results, raising any rank's error.
    ``fn`` must be importable (defined at module level)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed: {value}")
            results.append(value)
    return results


def run_pretrain(argv, forward_step=None):
    """Run pretrain_gpt.py's pretrain() in this process (with ``forward_step`` instead of
    pretrain_gpt's when given); return (exit code, printed lines)."""
    import pretrain_gpt
    from megatron.core import parallel_state
    from megatron.training import pretrain

    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
                     None, forward_step or pretrain_gpt.forward_step, argv=list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            parallel_state.destroy_model_parallel()
    return code, out.getvalue().splitlines()


def lm_losses(lines):
    """{iteration: 'lm loss' string as printed} from Megatron log lines."""
    found = {}
    for line in lines:
        m = re.search(r"iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: (\S+) \|", line)
        if m:
            found[int(m.group(1))] = m.group(2)
    return found


def validation_losses(lines):
    return [m.group(1) for line in lines
            if (m := re.search(r"validation loss at .*\| lm loss value: (\S+) \|", line))]


TINY_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "32", "--mock-data", "--tokenizer-type", "NullTokenizer",
              "--vocab-size", "500", "--micro-batch-size", "4", "--global-batch-size", "8",
              "--lr", "3e-3", "--num-workers", "0", "--log-interval", "1",
              "--eval-interval", "1000", "--eval-iters", "0"]


def train_layouts(run, placements, layouts):
    """{(layout, placement): (exit code, lm losses)} for each layout's placements, trained in
    this process. ``placements``: {name: extra flags}; ``layouts``: {name: (flags, names)}."""
    out = {}
    for name, (flags, which) in layouts.items():
        for placement in which:
            code, lines = run_pretrain(run + placements[placement] + flags +
                                       ["--norm-placement", placement])
            out[(name, placement)] = (code, lm_losses(lines))
    return out


def one_process_curves(run, placements):
    """{placement: {iteration: lm loss}} of one-process runs."""
    curves = {}
    for placement, extra in placements.items():
        code, lines = run_pretrain(run + extra + ["--norm-placement", placement])
        assert code == 0, lines[-3:]
        curves[placement] = {i: float(v) for i, v in lm_losses(lines).items()}
    return curves


def assert_same_curves(results, curves, iterations):
    """Every layout printed every iteration, each within 1e-4 relative of one process: fp32
    sums split over ranks round differently, and 20 Adam steps let those ulps grow to ~1e-6;
    1e-4 leaves room for nothing else."""
    import pytest
    for (layout, placement), (code, losses) in results.items():
        assert code == 0, (layout, placement)
        assert sorted(losses) == list(range(1, iterations + 1)), (layout, placement)
        for i, value in losses.items():
            assert float(value) == pytest.approx(curves[placement][i], rel=1e-4), \
                (layout, placement, i)
