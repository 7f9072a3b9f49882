"""Checkpoints that survive SIGKILL at any point of a save, runs that leave cleanly (exit
signal, time limit), --ckpt-keep-last, --ckpt-step, and asynchronous saving."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron.training import checkpointing
from tests.helpers import REPO, TINY_MODEL, free_port, lm_losses, run_distributed, run_pretrain

# Dropout on: an exact resume must restore the RNG streams as well.
RUN = TINY_MODEL + ["--train-iters", "8", "--hidden-dropout", "0.1", "--attention-dropout",
                    "0.1", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
                    "--norm-placement", "peri"]

# Run pretrain_gpt.py in a fresh interpreter whose torch.save / os.replace SIGKILL the
# process at the chosen point of the save of iteration 6.
KILLER = r"""
import os, runpy, signal, sys
import torch
point, argv = sys.argv[1], sys.argv[2:]
real_save, real_replace = torch.save, os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save(obj, path, *a, **k):
    if "iter_0000006.tmp" in str(path):
        real_save(obj, path, *a, **k)
        if point == "writing":  # half a file on disk
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            die()
    return real_save(obj, path, *a, **k)

def replace(src, dst, *a, **k):
    if point == "tracker" and dst.endswith("latest_checkpointed_iteration.txt") and \
            open(src).read() == "6":
        die()  # iter_0000006 is in place, the tracker still names 3
    return real_replace(src, dst, *a, **k)

torch.save, os.replace = save, replace
sys.argv = ["pretrain_gpt.py"] + argv
runpy.run_path(os.path.join(os.environ["REPO"], "pretrain_gpt.py"), run_name="__main__")
"""


@pytest.fixture(scope="module")
def straight():
    code, lines = run_pretrain(RUN)
    assert code == 0
    return lm_losses(lines)


@pytest.mark.parametrize("point", ["writing", "tracker"])
def test_sigkill_during_save_then_resume_is_exact(tmp_path, straight, point):
    ckpt = str(tmp_path / "ckpt")
    argv = RUN + ["--save", ckpt, "--load", ckpt, "--save-interval", "3"]
    killed = subprocess.run([sys.executable, "-c", KILLER, point, *argv], cwd=REPO,
                            env={**os.environ, "REPO": REPO}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "3"
    code, lines = run_pretrain(argv)
    assert code == 0
    assert any("loaded checkpoint" in line and "at iteration 3" in line for line in lines)
    resumed = lm_losses(lines)
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    assert resumed == {i: straight[i] for i in resumed}  # to the last printed digit
    assert sorted(os.listdir(ckpt)) == ["iter_0000003", "iter_0000006", "iter_0000008",
                                        "latest_checkpointed_iteration.txt"]


def test_keep_last_and_ckpt_step(tmp_path, straight):
    ckpt = str(tmp_path / "ckpt")
    code, _ = run_pretrain(RUN + ["--train-iters", "5", "--lr-decay-iters", "8", "--save", ckpt,
                                  "--save-interval", "1", "--ckpt-keep-last", "2"])
    assert code == 0
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000005",
                                        "latest_checkpointed_iteration.txt"]
    code, lines = run_pretrain(RUN + ["--load", ckpt, "--ckpt-step", "4"])
    assert code == 0
    resumed = lm_losses(lines)
    assert resumed == {i: straight[i] for i in range(5, 9)}
    code, lines = run_pretrain(RUN + ["--load", ckpt, "--ckpt-step", "3"])
    errors = [line for line in lines if "error:" in line]
    assert code == 2 and len(errors) == 1
    assert "iter_0000003 does not exist (iterations in" in errors[0] and "4, 5" in errors[0]


def test_async_save_overlaps_training_and_resumes_exactly(tmp_path, straight, monkeypatch):
    """Each file takes 1 s to write: training goes on meanwhile, the next save waits for the
    previous one, and the tracker names only complete checkpoints."""
    real = checkpointing._write_file
    trackers = []

    def slow_write(path, state):
        time.sleep(1.0)
        trackers.append(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read()
                        if os.path.exists(os.path.join(ckpt, "latest_checkpointed_iteration.txt"))
                        else None)
        real(path, state)
    monkeypatch.setattr(checkpointing, "_write_file", slow_write)
    ckpt = str(tmp_path / "ckpt")
    code, lines = run_pretrain(RUN + ["--save", ckpt, "--save-interval", "2", "--async-save",
                                      "--exit-interval", "5"])
    assert code == 0
    events = [line for line in lines if "asynchronous" in line or "iteration        3/" in line]
    assert "scheduled asynchronous save of iteration       2" in events[0]
    assert "iteration        3/" in events[1]  # trained on while iteration 2 was written
    order = [line.split("iteration")[1].split()[0] for line in lines
             if "asynchronous" in line]
    assert order == ["2", "2", "4", "4", "5", "5"]  # scheduled, saved; each save waits
    assert trackers == [None, "2", "4"]  # updated only once the files were complete
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "5"
    monkeypatch.undo()
    code, lines = run_pretrain(RUN + ["--load", ckpt])
    assert code == 0 and lm_losses(lines) == {i: straight[i] for i in range(6, 9)}


def _async_with_a_slow_rank(ckpt):
    """Tensor rank 1 writes each file 1.5 s late (training goes on meanwhile) and records the
    tracker just before writing it."""
    rank = int(os.environ["RANK"])
    real, seen = checkpointing._write_file, []

    def write(path, state):
        if rank == 1:
            time.sleep(1.5)
            tracker = os.path.join(ckpt, "latest_checkpointed_iteration.txt")
            seen.append(open(tracker).read() if os.path.exists(tracker) else None)
        real(path, state)
    checkpointing._write_file = write
    code, _ = run_pretrain(TINY_MODEL + ["--train-iters", "4", "--tensor-model-parallel-size",
                                         "2", "--save", ckpt, "--save-interval", "2",
                                         "--async-save"])
    return code, seen


def test_async_save_publishes_only_when_every_rank_is_done(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    (code0, _), (code1, seen1) = run_distributed(_async_with_a_slow_rank, 2, ckpt)
    assert code0 == code1 == 0
    assert seen1 == [None, "2"]  # rank 0's file of each save was long complete
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "4"
    assert sorted(os.listdir(os.path.join(ckpt, "iter_0000004"))) == ["mp_rank_00", "mp_rank_01"]


def _launch(argv, world_size):
    """pretrain_gpt.py on ``world_size`` processes with torchrun's environment (gloo), each
    printing unbuffered to its own pipe."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, "pretrain_gpt.py", *argv], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, start_new_session=True,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def _saved_iterations(ckpt, tp):
    import torch
    tracker = open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read()
    return int(tracker), [torch.load(checkpointing.model_file(
        checkpointing.iteration_dir(ckpt, int(tracker)), t, 0, 1), weights_only=True,
        mmap=True)["iteration"] for t in range(tp)]


LONG = TINY_MODEL + ["--train-iters", "100000", "--tensor-model-parallel-size", "2"]


def test_exit_signal_saves_and_exits_zero(tmp_path):
    """SIGTERM to one rank only (to its whole process group, data-loader workers included,
    as torchrun and SLURM send it): every rank saves the same iteration and exits 0."""
    ckpt = str(tmp_path / "ckpt")
    procs = _launch(LONG + ["--save", ckpt, "--exit-signal-handler", "--num-workers", "1"], 2)
    last = procs[1]  # prints the log lines
    seen = []
    for line in last.stdout:
        seen.append(line)
        if " iteration        5/" in line:
            break
    os.killpg(procs[0].pid, signal.SIGTERM)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    logged = lm_losses(seen + outputs[1].splitlines())
    saved, in_files = _saved_iterations(ckpt, 2)
    assert in_files == [saved, saved] and max(logged) == saved
    assert f"exiting program after receiving SIGTERM at iteration {saved}" in outputs[0]


def test_exit_duration_stops_every_rank_at_the_same_iteration(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    procs = _launch(LONG + ["--save", ckpt, "--exit-duration-in-mins", "0.05"], 2)
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    saved, in_files = _saved_iterations(ckpt, 2)
    assert in_files == [saved, saved]
    assert f"minutes at iteration {saved}" in outputs[0]
    assert max(lm_losses(outputs[1].splitlines())) == saved


def _error(lines):
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, lines[-5:]
    return errors[0]


def test_unusable_checkpoints_are_refused_before_anything_is_written(tmp_path):
    """A missing shard, a weights-only checkpoint without --finetune, a layout that cannot
    hold the model: one sentence naming the path, exit 2, the checkpoint untouched."""
    one = str(tmp_path / "one")
    code, _ = run_pretrain(TINY_MODEL + ["--train-iters", "2", "--save", one])
    assert code == 0
    convert = [sys.executable, os.path.join(REPO, "tools", "checkpoint", "convert.py"),
               "--model-type", "GPT", "--loader", "megatron", "--saver", "megatron",
               "--load-dir", one]
    two = str(tmp_path / "two")
    result = subprocess.run(convert + ["--save-dir", two, "--target-tensor-parallel-size", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    missing = os.path.join(two, "iter_0000002", "mp_rank_01")
    import shutil
    shutil.rmtree(missing)
    before = sorted(os.listdir(two))
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "4", "--load", two, "--save", two])
    assert code == 2 and f"{missing}/model_optim_rng.pt is missing" in _error(lines)
    assert sorted(os.listdir(two)) == before
    # more pipeline stages than layers, offline
    result = subprocess.run(convert + ["--save-dir", str(tmp_path / "pp4"),
                                       "--target-pipeline-parallel-size", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and not os.path.exists(tmp_path / "pp4")
    assert "--target-pipeline-parallel-size" in result.stderr.strip().splitlines()[-1]
    # a weights-only checkpoint (an offline conversion from Hugging Face is a release one;
    # here: the optimizer entries removed) needs --finetune or --no-load-optim
    import torch
    path = os.path.join(one, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, path)
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "4", "--load", one])
    assert code == 2 and one in _error(lines) and "--no-load-optim" in _error(lines)
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "4", "--load", one,
                                             "--no-load-optim"])
    assert code == 0 and lm_losses(lines).keys() == {3, 4}
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "2", "--load", one, "--finetune"])
    assert code == 0 and lm_losses(lines).keys() == {1, 2}
