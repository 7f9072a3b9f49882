"""tools/evaluate.py against lm-evaluation-harness 0.4 on the same Hugging Face export, the
same local task files and the same machine.

    python tools/benchmark_evaluate.py                        # needs .venv-lmeval (see README)
    python tools/benchmark_evaluate.py --examples 400 --lm-eval-python /path/to/python

Builds, in a temporary directory: a SentencePiece tokenizer trained on the task texts, a
randomly initialized model of the given shape saved as a checkpoint (pretrain_gpt.py, zero
iterations of training beyond one step), its Hugging Face export, and --examples made-up
examples per task in the public layouts (evaluation/sample_tasks.py). It then times, as a
user runs them, whole commands with their start-up:

- ``evaluate.py --load`` (our model and scoring: each question's choices in one forward
  pass, the context computed once),
- ``evaluate.py --hf-model`` on the export (transformers' model, our scoring),
- ``lm_eval --model hf`` on the export with task configs for the same files
  (evaluation/lm_eval_tasks.py), --batch_size as given,

and prints wall seconds, questions/s and the ratio to lm-evaluation-harness, and whether the
accuracies agree.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools")]

from evaluation.lm_eval_tasks import write_configs  # noqa: E402
from evaluation.sample_tasks import MAKERS, write_task_data  # noqa: E402

TASKS = ["arc_easy", "piqa", "hellaswag", "winogrande", "boolq"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=200, help="per task")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=800, help="of the trained tokenizer")
    p.add_argument("--batch-size", type=int, default=8,
                   help="lm_eval --batch_size and evaluate.py --micro-batch-size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lm-eval-python", default=os.path.join(REPO, ".venv-lmeval", "bin",
                                                            "python"),
                   help="a python with lm-eval 0.4 installed")
    return p.parse_args(argv)


def run(cmd, env, cwd):
    start = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    seconds = time.time() - start
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stdout[-2000:]}"
                         f"{result.stderr[-3000:]}")
    return seconds, result.stdout


def build(a, root, env):
    """The tokenizer, checkpoint, export and task files under ``root``."""
    data = write_task_data(os.path.join(root, "tasks"), n=a.examples)
    corpus = os.path.join(root, "corpus.jsonl")
    with open(corpus, "w") as f:
        for path in glob.glob(os.path.join(data, "**", "*.jsonl"), recursive=True):
            for line in open(path):
                f.write(json.dumps({"text": line}) + "\n")
    run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus,
         "--output", os.path.join(root, "tok"), "--vocab-size", str(a.vocab_size)], env, root)
    ckpt, hf = os.path.join(root, "ckpt"), os.path.join(root, "hf")
    run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), "--num-layers",
         str(a.num_layers), "--hidden-size", str(a.hidden_size), "--num-attention-heads",
         str(a.num_attention_heads), "--seq-length", str(a.seq_length),
         "--max-position-embeddings", str(a.seq_length), "--mock-data", "--tokenizer-type",
         "GPTSentencePieceTokenizer", "--tokenizer-model", os.path.join(root, "tok.model"),
         "--norm-placement", "peri", "--normalization", "RMSNorm", "--swiglu",
         "--position-embedding-type", "rope", "--disable-bias-linear", "--micro-batch-size",
         "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-4",
         "--num-workers", "0", "--eval-iters", "0", "--save", ckpt], env, root)
    run([sys.executable, os.path.join(REPO, "tools", "checkpoint", "convert.py"),
         "--model-type", "GPT", "--loader", "megatron", "--saver", "hf", "--load-dir", ckpt,
         "--save-dir", hf], env, root)
    return data, ckpt, hf


def main(argv=None) -> int:
    a = parse_args(argv)
    tasks = [t for t in a.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in MAKERS]
    if unknown:
        raise SystemExit(f"--tasks: no sample data for {', '.join(unknown)}")
    if not os.path.exists(a.lm_eval_python):
        raise SystemExit(f"--lm-eval-python {a.lm_eval_python} does not exist (see the README "
                         "for the lm-eval environment)")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
    questions = len(tasks) * a.examples
    with tempfile.TemporaryDirectory() as root:
        env["HF_HOME"] = os.path.join(root, "hf_home")
        data, ckpt, hf = build(a, root, env)
        tasks_dir = subprocess.run(
            [a.lm_eval_python, "-c",
             "import lm_eval.tasks, os; print(os.path.dirname(lm_eval.tasks.__file__))"],
            capture_output=True, text=True, check=True, cwd="/").stdout.strip()
        configs = os.path.join(root, "configs")
        write_configs(data, configs, tasks_dir, names=tasks)
        evaluate = [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--tasks",
                    ",".join(tasks), "--task-data-dir", data, "--micro-batch-size",
                    str(a.batch_size)]
        rows, accs = [], {}
        for label, cmd in (("evaluate.py --load", evaluate + ["--load", ckpt]),
                           ("evaluate.py --hf-model", evaluate + ["--hf-model", hf])):
            out = os.path.join(root, label.split()[-1].strip("-") + ".json")
            seconds, _ = run(cmd + ["--output", out], env, root)
            with open(out) as f:
                payload = json.load(f)
            accs[label] = {t: payload["results"][t]["acc"] for t in tasks}
            rows.append((label, seconds, payload["seconds"]))
        lm_out = os.path.join(root, "lm_eval")
        seconds, _ = run([a.lm_eval_python, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={hf},dtype=float32", "--include_path", configs,
                          "--tasks", ",".join(f"local_{t}" for t in tasks), "--device", "cpu",
                          "--batch_size", str(a.batch_size), "--output_path", lm_out],
                         env, root)
        [results] = glob.glob(os.path.join(lm_out, "*", "results_*.json"))
        with open(results) as f:
            reported = json.load(f)["results"]
        accs["lm_eval"] = {t: reported[f"local_{t}"]["acc,none"] for t in tasks}
        rows.append(("lm_eval --model hf", seconds, None))
    print(f"{questions} questions ({a.examples} per task: {', '.join(tasks)}); model: "
          f"{a.num_layers} layers, hidden {a.hidden_size}, rows of {a.seq_length}; "
          f"batch {a.batch_size}; {a.threads} threads")
    header = f"{'command':<24} | {'wall s':>7} | {'questions/s':>11} | {'scoring s':>9} | " \
             f"{'lm_eval wall / this':>19}"
    print(header + "\n" + "-" * len(header))
    reference = rows[-1][1]
    for label, wall, scoring in rows:
        print(f"{label:<24} | {wall:7.1f} | {questions / wall:11.1f} | "
              f"{scoring if scoring is not None else float('nan'):9.1f} | "
              f"{reference / wall:19.2f}")
    same = all(accs[k] == accs["lm_eval"] for k in accs)
    print("accuracies: " + ("the same per task in all three" if same else
                            f"DIFFER: {json.dumps(accs)}"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
