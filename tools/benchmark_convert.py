"""Seconds and peak memory of tools/checkpoint/convert.py on a ~125M-parameter model.

    python tools/benchmark_convert.py [--num-layers 12 --hidden-size 768 ...] [--workdir DIR]

Trains the model for one iteration (so the source is a real checkpoint, optimizer state
included) with pretrain_gpt.py, then times each conversion as its own process and reads that
process's peak resident memory (ru_maxrss of the child): Megatron -> Hugging Face (Glm4, with
and without --verify), Hugging Face -> Megatron at TP=2 x PP=2, and Megatron -> Megatron
re-layout. Prints a table with the weights' size and each peak as a multiple of it; exits 1
when a conversion without --verify peaks above 2.5x the weights.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(REPO, "tools", "checkpoint", "convert.py")


def run_child(cmd, env):
    """(seconds, peak RSS bytes, stdout) of one child process (its own rusage, by wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.time() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read()[-2000:]}")
        return seconds, usage.ru_maxrss * 1024, out.read()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--ffn-hidden-size", type=int, default=2048)
    p.add_argument("--num-attention-heads", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=50256)
    p.add_argument("--workdir", default=None, help="kept when given (default: a temp dir)")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2")
    ckpt = os.path.join(work, "ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    train = [sys.executable, os.path.join(REPO, "pretrain_gpt.py"),
             "--num-layers", str(a.num_layers), "--hidden-size", str(a.hidden_size),
             "--ffn-hidden-size", str(a.ffn_hidden_size),
             "--num-attention-heads", str(a.num_attention_heads), "--seq-length", "64",
             "--norm-placement", "peri", "--normalization", "RMSNorm", "--swiglu",
             "--position-embedding-type", "rope", "--disable-bias-linear",
             "--mock-data", "--tokenizer-type", "NullTokenizer",
             "--vocab-size", str(a.vocab_size), "--micro-batch-size", "1",
             "--train-iters", "1", "--lr", "1e-4", "--eval-iters", "0", "--num-workers", "0",
             "--save", ckpt]
    print(f"training one iteration to get a checkpoint in {ckpt} ...", flush=True)
    subprocess.run(train, env=env, check=True, capture_output=True)
    import torch
    state = torch.load(os.path.join(ckpt, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"),
                       map_location="cpu", weights_only=True, mmap=True)
    weights = sum(t.numel() * t.element_size() for t in state["model"].values())
    params = sum(t.numel() for t in state["model"].values())
    file_size = os.path.getsize(os.path.join(ckpt, "iter_0000001", "mp_rank_00",
                                             "model_optim_rng.pt"))
    del state
    hf, back, relayout = (os.path.join(work, n) for n in ("hf", "back", "relayout"))
    base = [sys.executable, CONVERT, "--model-type", "GPT", "--overwrite"]
    runs = [
        ("megatron -> megatron (TP=2 x PP=2)", base + [
            "--loader", "megatron", "--saver", "megatron", "--load-dir", ckpt, "--save-dir",
            relayout, "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size",
            "2", "--no-verify"], True),
        ("megatron -> hf (Glm4)", base + ["--loader", "megatron", "--saver", "hf",
                                          "--load-dir", ckpt, "--save-dir", hf,
                                          "--no-verify"], True),
        ("hf -> megatron (TP=2 x PP=2)", base + [
            "--loader", "hf", "--saver", "megatron", "--load-dir", hf, "--save-dir", back,
            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
            "--no-verify"], True),
        ("megatron -> hf, --verify", base + ["--loader", "megatron", "--saver", "hf",
                                             "--load-dir", ckpt, "--save-dir", hf], False),
    ]
    print(f"model: {params / 1e6:.1f}M parameters, {weights / 1e6:.0f} MB of fp32 weights; "
          f"source checkpoint file {file_size / 1e6:.0f} MB (with optimizer state)\n")
    print(f"{'conversion':38s} {'seconds':>8s} {'peak RSS (MB)':>14s} {'x weights':>10s}")
    failed = False
    results = []
    for name, cmd, bounded in runs:
        seconds, peak, out = run_child(cmd, env)
        ratio = peak / weights
        failed |= bounded and ratio > 2.5
        results.append({"conversion": name, "seconds": seconds, "peak_rss_mb": peak / 1e6,
                        "ratio": ratio})
        print(f"{name:38s} {seconds:8.1f} {peak / 1e6:14.0f} {ratio:10.2f}", flush=True)
        if "verify:" in out:
            print("   " + [line for line in out.splitlines() if line.startswith("verify")][-1])
    with open(os.path.join(work, "benchmark_convert.json"), "w") as f:
        json.dump({"parameters": params, "weight_bytes": weights, "runs": results}, f, indent=2)
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print("\nFAIL: a conversion without --verify peaked above 2.5x the weights")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
