"""Seconds the training loop is blocked per checkpoint save, synchronous vs --async-save, and
load time, for a ~125M-parameter model.

    python tools/benchmark_checkpoint.py [--num-layers 12 --hidden-size 768 ...] [--repeats 3]

Builds the model and optimizer as pretrain_gpt.py does (one process, fp32, Peri-LN), takes
one optimizer step so the Adam moments exist, then times, each the median of --repeats:
- a synchronous save (``save_checkpoint``: the loop waits for every byte on disk);
- an asynchronous save: the time ``save_checkpoint`` holds the loop, how much of it was
  the copy of the state to CPU memory (timed inside the same call), and the background
  write until the checkpoint is final;
- a load (open, check, fill model and optimizer) of the checkpoint just written.
Prints a table; exits 1 when an asynchronous save blocks for more than its copy to CPU
memory plus 0.5 s (barriers, RNG states, bookkeeping).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--ffn-hidden-size", type=int, default=2048)
    p.add_argument("--num-attention-heads", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=50256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="kept when given (default: a temp dir)")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    save = os.path.join(work, "ckpt")
    shutil.rmtree(save, ignore_errors=True)


    import pretrain_gpt
    from megatron.training import checkpointing
    from megatron.training.initialize import destroy_distributed, initialize_megatron
    from megatron.training.training import setup_model_and_optimizer

    argv = ["--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
            "--ffn-hidden-size", str(a.ffn_hidden_size),
            "--num-attention-heads", str(a.num_attention_heads), "--seq-length", "64",
            "--norm-placement", "peri", "--normalization", "RMSNorm", "--swiglu",
            "--position-embedding-type", "rope", "--disable-bias-linear",
            "--mock-data", "--tokenizer-type",
            "NullTokenizer", "--vocab-size", str(a.vocab_size), "--micro-batch-size", "1",
            "--train-iters", "10", "--lr", "1e-4", "--save", save, "--load", save]
    args = initialize_megatron(argv=argv)
    model, optimizer, scheduler = setup_model_and_optimizer(pretrain_gpt.model_provider, args)
    args.consumed_train_samples = args.consumed_valid_samples = 0
    for chunk in model:  # one step with random gradients: Adam's moments exist
        for param in chunk.module.parameters():
            param.main_grad.normal_()
    optimizer.step()
    n_params = sum(p.numel() for chunk in model for p in chunk.parameters())
    quiet = open(os.devnull, "w")

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    def median_of(fn):
        return statistics.median(fn() for _ in range(a.repeats))

    iteration = [0]

    def sync_save():
        iteration[0] += 1
        args.async_save = False
        with _redirect(quiet):
            return timed(lambda: checkpointing.save_checkpoint(
                iteration[0], model, optimizer, scheduler, args))[0]

    blocked, copies, written = [], [], []

    def async_save():
        iteration[0] += 1
        args.async_save = True
        with _redirect(quiet):
            seconds, _ = timed(lambda: checkpointing.save_checkpoint(
                iteration[0], model, optimizer, scheduler, args))
            blocked.append(seconds)
            copies.append(checkpointing.last_copy_seconds)
            written.append(timed(lambda: checkpointing.finalize_async_save(blocking=True))[0]
                            + seconds)
        return seconds

    def load():
        args.async_save = False
        with _redirect(quiet):
            seconds, reader = timed(lambda: checkpointing.open_checkpoint(args))
            return seconds + timed(lambda: checkpointing.load_checkpoint(
                reader, model, optimizer, scheduler, args))[0]

    sync = median_of(sync_save)
    async_blocked = median_of(async_save)
    copy = statistics.median(copies)
    loading = median_of(load)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
               os.walk(checkpointing.iteration_dir(save, iteration[0])) for f in fs)
    destroy_distributed()
    print(f"\ncheckpoint of a {n_params / 1e6:.0f}M-parameter model (fp32, Adam): "
          f"{size / 1e9:.2f} GB on disk; median of {a.repeats}")
    print("| what | seconds |")
    print("|---|---|")
    print(f"| synchronous save: loop blocked | {sync:.2f} |")
    print(f"| --async-save: loop blocked | {async_blocked:.2f} |")
    print(f"| ... of which copying the state to CPU memory | {copy:.2f} |")
    print(f"| ... background write until the checkpoint is final | "
          f"{statistics.median(written):.2f} |")
    print(f"| load (open, check, fill model and optimizer) | {loading:.2f} |")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    over = [(b, c) for b, c in zip(blocked, copies) if b > c + 0.5]
    if over:
        print(f"FAIL: an asynchronous save blocked {over[0][0]:.2f} s, more than its copy to "
              f"CPU memory ({over[0][1]:.2f} s) + 0.5 s")
        return 1
    return 0


class _redirect:
    """Silence the save/load messages while timing."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.saved = sys.stdout
        sys.stdout = self.stream

    def __exit__(self, *exc):
        sys.stdout = self.saved


if __name__ == "__main__":
    sys.exit(main())
