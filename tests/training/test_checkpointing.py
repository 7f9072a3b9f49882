"""Checkpoint layout, atomic writes, exact resume, and refusal of unusable checkpoints."""

import os

import pytest
import torch

from tests.helpers import TINY_MODEL, lm_losses, run_pretrain, validation_losses

# Dropout on: resuming must restore the RNG streams as well as the weights and data position.
RESUME_RUN = TINY_MODEL + ["--train-iters", "8", "--hidden-dropout", "0.1",
                           "--attention-dropout", "0.1", "--lr-warmup-iters", "2",
                           "--lr-decay-style", "cosine", "--eval-interval", "3",
                           "--eval-iters", "1"]


@pytest.mark.parametrize("placement", ["pre", "post", "peri", "mix"])
def test_resume_gives_the_same_losses(tmp_path, placement):
    """Losses of iterations 6..8 after stopping at 5 equal the uninterrupted run's, to the
    last printed digit (CPU fp32 is deterministic, so the runs are bitwise identical)."""
    run = RESUME_RUN + ["--norm-placement", placement]
    code, straight = run_pretrain(run)
    assert code == 0
    ckpt = str(tmp_path / "ckpt")
    code, first = run_pretrain(run + ["--save", ckpt, "--load", ckpt, "--exit-interval", "5"])
    assert code == 0 and any("exiting program at iteration 5" in line for line in first)
    code, resumed = run_pretrain(run + ["--save", ckpt, "--load", ckpt])
    assert code == 0
    expected, got = lm_losses(straight), lm_losses(resumed)
    assert sorted(got) == [6, 7, 8]
    assert {i: expected[i] for i in got} == got
    assert lm_losses(first) == {i: expected[i] for i in range(1, 6)}
    # evaluation continues with the next validation samples too (iteration 6, then final)
    assert validation_losses(resumed) == validation_losses(straight)[1:]


def test_layout_and_weights_only(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    code, _ = run_pretrain(TINY_MODEL + ["--train-iters", "4", "--save", ckpt,
                                         "--save-interval", "2"])
    assert code == 0
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004",
                                        "latest_checkpointed_iteration.txt"]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "4"
    state = torch.load(os.path.join(ckpt, "iter_0000004", "mp_rank_00", "model_optim_rng.pt"),
                       weights_only=True)
    assert state["iteration"] == 4 and state["args"]["consumed_train_samples"] == 32
    assert state["args"]["norm_placement"] == "pre"
    assert {"model", "optimizer", "opt_param_scheduler", "rng_state"} <= set(state)
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in state["model"]


def test_missing_checkpoint_starts_fresh_with_one_warning(tmp_path):
    ckpt = str(tmp_path / "fresh")
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "1", "--load", ckpt])
    assert code == 0
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1 and "will not load any checkpoints" in warnings[0]


@pytest.fixture(scope="module")
def saved_pre(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("saved") / "ckpt")
    code, _ = run_pretrain(TINY_MODEL + ["--train-iters", "2", "--save", ckpt])
    assert code == 0
    return ckpt


def error_line(lines):
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, lines
    return errors[0]


def test_other_model_arguments_are_refused(saved_pre):
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "3", "--load", saved_pre,
                                             "--norm-placement", "peri"])
    assert code == 2
    line = error_line(lines)
    assert saved_pre in line and "--norm-placement is pre there but peri here" in line
    assert not any("building GPT model" in x for x in lines)  # refused before the build


def test_unreadable_checkpoint_is_refused(tmp_path, saved_pre):
    import shutil
    ckpt = str(tmp_path / "copy")
    shutil.copytree(saved_pre, ckpt)
    path = os.path.join(ckpt, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    with open(path, "r+b") as f:
        f.truncate(1000)
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "3", "--load", ckpt])
    assert code == 2 and path in error_line(lines) and "truncated or corrupt" in error_line(lines)
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("7")
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "3", "--load", ckpt])
    assert code == 2 and "iter_0000007" in error_line(lines)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, saved_pre, monkeypatch):
    """A save that dies while writing leaves the tracker and the last checkpoint intact."""
    import shutil

    from megatron.training import checkpointing
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(saved_pre, ckpt)

    def dying_save(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(checkpointing.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(TINY_MODEL + ["--train-iters", "3", "--load", ckpt, "--save", ckpt])
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "2"
    assert not os.path.exists(os.path.join(ckpt, "iter_0000003"))
    monkeypatch.undo()
    code, lines = run_pretrain(TINY_MODEL + ["--train-iters", "3", "--load", ckpt])
    assert code == 0 and any("loaded checkpoint" in line for line in lines)
