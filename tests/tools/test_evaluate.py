"""tools/evaluate.py: zero-shot accuracies as lm-evaluation-harness 0.4.13 reports them on the
Hugging Face export of the same checkpoint (example by example), at any tensor x pipeline
layout, with every file format, and one clear sentence for bad input.

The checkpoint's weights are redrawn with a wide spread (as the conversion tests do), so that
choices differ by whole units of log-likelihood and no argmax rests on a rounding tie.
"""

import contextlib
import glob
import io
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_distributed, run_pretrain

pytest.importorskip("transformers", reason="the export needs transformers")
sys.path[:0] = [os.path.join(REPO, "tools", "checkpoint"), os.path.join(REPO, "tools")]
import convert  # noqa: E402
import evaluate  # noqa: E402
from evaluation.lm_eval_tasks import write_configs  # noqa: E402
from evaluation.sample_tasks import write_task_data  # noqa: E402

TASKS = "arc_easy,arc_challenge,piqa,hellaswag,openbookqa,winogrande,siqa,boolq,mmlu_anatomy"
FORMATS = {"piqa": "parquet", "boolq": "json", "hellaswag": "parquet"}
LM_EVAL = os.path.join(REPO, ".venv-lmeval")


def run_evaluate(*argv):
    """(exit code, output) of evaluate.main in this process."""
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = evaluate.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue()


@pytest.fixture(scope="module")
def model(sp_model, tmp_path_factory):
    """A short Peri-LN run (SentencePiece tokenizer), weights spread, and its export."""
    from tests.tools.test_convert import spread_weights
    root = tmp_path_factory.mktemp("evaluate")
    ckpt, hf = str(root / "ckpt"), str(root / "hf")
    code, lines = run_pretrain([
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128", "--mock-data",
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model,
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
        "--lr", "1e-3", "--num-workers", "0", "--eval-iters", "0", "--norm-placement", "peri",
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--save", ckpt])
    assert code == 0, lines[-3:]
    spread_weights(ckpt)
    with contextlib.redirect_stdout(io.StringIO()):
        assert convert.main(["--model-type", "GPT", "--loader", "megatron", "--saver", "hf",
                             "--load-dir", ckpt, "--save-dir", hf]) == 0
    data = write_task_data(str(root / "tasks"), n=12, formats=FORMATS)
    return dict(ckpt=ckpt, hf=hf, data=data, root=root)


@pytest.fixture(scope="module")
def ours(model):
    out = str(model["root"] / "ours.json")
    code, text = run_evaluate("--load", model["ckpt"], "--tasks", TASKS, "--task-data-dir",
                              model["data"], "--output", out, "--log-samples",
                              "--micro-batch-size", "3")
    assert code == 0, text
    with open(out) as f:
        return json.load(f), text


def _lm_eval_python():
    """.venv-lmeval with lm-eval 0.4.13 (made once; skipped with the reason if impossible)."""
    python = os.path.join(LM_EVAL, "bin", "python")

    def works():
        return os.path.exists(python) and subprocess.run(
            [python, "-c", "import lm_eval, transformers, pyarrow"], capture_output=True,
            cwd="/").returncode == 0
    if not works():
        steps = [[sys.executable, "-m", "venv", LM_EVAL],
                 [python, "-m", "pip", "install", "-q", "torch==2.13.0"],
                 [python, "-m", "pip", "install", "-q", "lm-eval[hf]==0.4.13", "pyarrow"]]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, timeout=1200)
            if result.returncode != 0:
                pytest.skip("lm-evaluation-harness 0.4.13 could not be installed: "
                            f"{result.stderr.strip().splitlines()[-1:]}")
        if not works():
            pytest.skip("lm-eval 0.4.13 installed but does not import")
    return python


def test_table_json_and_speed_line(ours):
    payload, text = ours
    assert "questions/s" in text and payload["questions"] == 9 * 12
    for name in ("arc_easy", "piqa", "winogrande", "social_iqa", "boolq", "mmlu_anatomy"):
        metrics = payload["results"][name]
        assert metrics["examples"] == 12 and 0.0 <= metrics["acc"] <= 1.0
        assert len(payload["samples"][name]) == 12
    assert "acc_norm" in payload["results"]["hellaswag"]
    assert "acc_norm" not in payload["results"]["winogrande"]


def test_agrees_with_lm_evaluation_harness(model, ours, tmp_path):
    python = _lm_eval_python()
    tasks_dir = subprocess.run(
        [python, "-c", "import lm_eval.tasks, os; print(os.path.dirname(lm_eval.tasks.__file__))"],
        capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    configs = str(tmp_path / "configs")
    names = write_configs(model["data"], configs, tasks_dir)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [python, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={model['hf']},dtype=float32", "--include_path", configs, "--tasks",
         ",".join(n for n in names if not n.startswith("local_mmlu_")), "--device", "cpu",
         "--batch_size", "8", "--log_samples", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    payload, _ = ours
    checked = 0
    for name, metrics in payload["results"].items():
        [path] = glob.glob(str(tmp_path / "out" / "*" / f"samples_local_{name}_*.jsonl"))
        with open(path) as f:
            theirs = sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
        mine = payload["samples"][name]
        assert len(theirs) == len(mine) == 12, name
        for a, b in zip(mine, theirs):
            lls = [float(r[0]) for r in b["filtered_resps"]]
            # fp32 forward passes of different shapes: equal to summation order
            assert a["loglikelihoods"] == pytest.approx(lls, rel=1e-5, abs=1e-4), (name, a)
            assert a["pred"] == max(range(len(lls)), key=lambda k: (lls[k], -k)), (name, a)
            assert float(b["acc"]) == (a["pred"] == a["gold"]), (name, a)
            if "acc_norm" in b:
                assert float(b["acc_norm"]) == (a["pred_norm"] == a["gold"]), (name, a)
            checked += 1
    assert checked == 9 * 12
    [results] = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    with open(results) as f:
        reported = json.load(f)["results"]
    for name, metrics in payload["results"].items():
        for key in ("acc", "acc_norm"):
            if key in metrics:
                assert metrics[key] == pytest.approx(reported[f"local_{name}"][f"{key},none"],
                                                     abs=1e-12), (name, key)
                assert metrics[f"{key}_stderr"] == pytest.approx(
                    reported[f"local_{name}"][f"{key}_stderr,none"], abs=1e-12), (name, key)


def test_hf_model_gives_the_same_answers(model, ours):
    out = str(model["root"] / "hf.json")
    code, text = run_evaluate("--hf-model", model["hf"], "--tasks", TASKS, "--task-data-dir",
                              model["data"], "--output", out, "--log-samples")
    assert code == 0, text
    with open(out) as f:
        theirs = json.load(f)
    payload, _ = ours
    for name, samples in payload["samples"].items():
        for a, b in zip(samples, theirs["samples"][name]):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-5, abs=1e-4)
            assert a["pred"] == b["pred"]


def _evaluate_layouts(ckpt, data, out_dir):
    results = {}
    for name, flags in (("TP=2", ["--tensor-model-parallel-size", "2"]),
                        ("PP=2", ["--pipeline-model-parallel-size", "2"])):
        out = os.path.join(out_dir, name + ".json")
        code, text = run_evaluate("--load", ckpt, "--tasks", "arc_easy,winogrande,hellaswag",
                                  "--task-data-dir", data, "--output", out, "--log-samples",
                                  "--micro-batch-size", "2", *flags)
        assert code == 0, text
        if os.environ["RANK"] == "0":
            with open(out) as f:
                results[name] = json.load(f)["samples"]
    return results


def test_tensor_and_pipeline_parallel_match_one_process(model, ours, tmp_path):
    results = run_distributed(_evaluate_layouts, 2, model["ckpt"], model["data"],
                              str(tmp_path))[0]
    payload, _ = ours
    for layout, samples in results.items():
        for name, records in samples.items():
            for a, b in zip(payload["samples"][name], records):
                assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], rel=1e-5,
                                                            abs=1e-4), (layout, name)
                assert a["pred"] == b["pred"], (layout, name)


def test_perplexity(model, tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": "the value of a sorted list " * k}) + "\n"
                            for k in (1, 5, 40)))
    code, text = run_evaluate("--load", model["ckpt"], "--perplexity-file", path)
    assert code == 0, text
    line = next(x for x in text.splitlines() if x.startswith("perplexity of "))
    assert "(3 documents)" in line and float(line.split(": ")[1].split()[0]) > 1.0


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "arc_easy,nope", "--task-data-dir", "DATA"], "unknown task 'nope'"),
    (["--tasks", "arc_easy"], "--tasks needs --task-data-dir"),
    ([], "nothing to evaluate"),
    (["--tasks", "piqa", "--task-data-dir", "EMPTY"], "piqa: no validation file in"),
    (["--tasks", "arc_easy", "--task-data-dir", "BAD"], "test.jsonl:2: no field 'answerKey'"),
    (["--perplexity-file", "missing.txt"], "--perplexity-file missing.txt does not exist"),
    (["--perplexity-file", "NOTEXT"], "held.jsonl:2: no \"text\" string"),
    (["--tasks", "arc_easy", "--task-data-dir", "EMPTYCHOICE"],
     "arc_easy: example 1, request 2: the continuation ' ' gives no tokens"),
    (["--tasks", "arc_easy", "--task-data-dir", "DATA", "--pipeline-model-parallel-size", "2"],
     "does not match the 1 process(es) launched"),
])
def test_bad_input_one_sentence(model, tmp_path, argv, message):
    bad = tmp_path / "bad" / "arc_easy"
    bad.mkdir(parents=True)
    good = {"question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
            "answerKey": "A"}
    (bad / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(
        {"question": "q?", "choices": good["choices"]}) + "\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "held.jsonl").write_text('{"text": "a b"}\n{"prompt": "a"}\n')
    empty = tmp_path / "empty_choice" / "arc_easy"
    empty.mkdir(parents=True)
    (empty / "test.jsonl").write_text(json.dumps(
        {"question": "q?", "choices": {"text": ["a", ""], "label": ["A", "B"]},
         "answerKey": "A"}) + "\n")
    swap = {"EMPTY": str(tmp_path / "empty"), "BAD": str(tmp_path / "bad"),
            "DATA": model["data"], "NOTEXT": str(tmp_path / "held.jsonl"),
            "EMPTYCHOICE": str(tmp_path / "empty_choice")}
    argv = [swap.get(a, a) for a in argv]
    code, text = run_evaluate("--load", model["ckpt"], *argv)
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], text
    assert lines[0].startswith("evaluate.py: error: ")
