"""Multiple-choice tasks as lm-evaluation-harness 0.4 defines them (zero-shot), read from local
files in the datasets' public layouts.

Each task turns a document into requests (context, continuation) -- the prompt and
``target_delimiter + choice``, or for winogrande one context per option and the sentence's
end as the continuation -- and scores the log-likelihoods as lm-evaluation-harness does:

- ``acc``: the highest log-likelihood is the gold choice;
- ``acc_norm``: the same after dividing each log-likelihood by the choice's length in
  characters (the choice text without the delimiter);
- standard errors: the sample standard deviation over examples / sqrt(n);
- mmlu: each subject's prompt starts with its description ("The following are multiple
  choice questions (with answers) about <subject>."); the group is the size-weighted mean of
  its 57 subjects with their pooled standard error.

Files: ``<task-data-dir>/<directory>/<split>.{jsonl,json,parquet}`` or Hugging Face's
``<split>-00000-of-00001.parquet`` shards (see ``describe()``); mmlu reads
``mmlu/<subject>/test.*`` per subject.
"""

import glob
import json
import math
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


class TaskError(ValueError):
    """An unknown task, a missing file or a record without a field: one sentence naming it."""


# ------------------------------------------------------------------ prompts
def _arc_target(doc):
    return doc["choices"]["label"].index(doc["answerKey"])


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of WikiHow's part
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_doc(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"])}


class Task:
    """A multiple-choice task: its prompt (``text``), choices, gold index and metrics."""

    def __init__(self, name: str, directory: str, split: str, fields: Sequence[str],
                 text: Callable, choices: Callable, target: Callable,
                 metrics=("acc", "acc_norm"), process: Optional[Callable] = None,
                 multiple_contexts: bool = False, delimiter: str = " "):
        self.name, self.directory, self.split, self.fields = name, directory, split, fields
        self.text, self.choices, self.target = text, choices, target
        self.metrics, self.process = metrics, process
        self.multiple_contexts, self.delimiter = multiple_contexts, delimiter

    def requests(self, doc) -> List[Tuple[str, str]]:
        choices = self.choices(doc)
        if self.multiple_contexts:  # winogrande: one context per option, one continuation
            continuation = self.delimiter + self.target_text(doc)
            return [(context, continuation) for context in choices]
        context = self.text(doc)
        return [(context, self.delimiter + c) for c in choices]

    def target_text(self, doc) -> str:
        return self.text(doc)


def _winogrande_choices(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _winogrande_target(doc):
    return {"1": 0, "2": 1}[str(doc["answer"])]


def _winogrande_continuation(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


MMLU_SUBJECTS = {  # subject: category (lm-evaluation-harness's mmlu groups)
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem",
    "business_ethics": "other", "clinical_knowledge": "other", "college_biology": "stem",
    "college_chemistry": "stem", "college_computer_science": "stem",
    "college_mathematics": "stem", "college_medicine": "other", "college_physics": "stem",
    "computer_security": "stem", "conceptual_physics": "stem", "econometrics":
    "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography":
    "social_sciences", "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences", "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities",
    "human_aging": "other", "human_sexuality": "social_sciences", "international_law":
    "humanities", "jurisprudence": "humanities", "logical_fallacies": "humanities",
    "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities",
    "prehistory": "humanities", "professional_accounting": "other", "professional_law":
    "humanities", "professional_medicine": "other", "professional_psychology":
    "social_sciences", "public_relations": "social_sciences", "security_studies":
    "social_sciences", "sociology": "social_sciences", "us_foreign_policy":
    "social_sciences", "virology": "other", "world_religions": "humanities",
}


def _mmlu_text(subject: str):
    """The subject's description (lm-evaluation-harness prepends it even zero-shot), then the
    question and its lettered choices."""
    description = ("The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n")

    def text(doc):
        c = doc["choices"]
        return (f"{description}{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\n"
                f"D. {c[3]}\nAnswer:")
    return text


def _build_tasks() -> Dict[str, Task]:
    arc = dict(split="test", fields=("question", "choices", "answerKey"),
               text=lambda d: f"Question: {d['question']}\nAnswer:",
               choices=lambda d: list(d["choices"]["text"]), target=_arc_target)
    tasks = [
        Task("arc_easy", "arc_easy", **arc),
        Task("arc_challenge", "arc_challenge", **arc),
        Task("piqa", "piqa", "validation", ("goal", "sol1", "sol2", "label"),
             text=lambda d: f"Question: {d['goal']}\nAnswer:",
             choices=lambda d: [d["sol1"], d["sol2"]], target=lambda d: int(d["label"])),
        Task("hellaswag", "hellaswag", "validation",
             ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
             text=lambda d: d["query"], choices=lambda d: d["choices"],
             target=lambda d: d["gold"], process=_hellaswag_doc),
        Task("openbookqa", "openbookqa", "test", ("question_stem", "choices", "answerKey"),
             text=lambda d: d["question_stem"], choices=lambda d: list(d["choices"]["text"]),
             target=lambda d: d["choices"]["label"].index(d["answerKey"].lstrip())),
        Task("winogrande", "winogrande", "validation", ("sentence", "option1", "option2",
                                                         "answer"),
             text=_winogrande_continuation, choices=_winogrande_choices,
             target=_winogrande_target, metrics=("acc",), multiple_contexts=True),
        Task("social_iqa", "social_iqa", "validation",
             ("context", "question", "answerA", "answerB", "answerC", "label"),
             text=lambda d: f"Q: {d['context']} {d['question']}\nA:",
             choices=lambda d: [d["answerA"], d["answerB"], d["answerC"]],
             target=lambda d: int(d["label"]) - 1, metrics=("acc",)),
        Task("boolq", "boolq", "validation", ("passage", "question", "label"),
             text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
             choices=lambda d: ["no", "yes"], target=lambda d: int(d["label"]),
             metrics=("acc",)),
    ]
    for subject in MMLU_SUBJECTS:
        tasks.append(Task(f"mmlu_{subject}", os.path.join("mmlu", subject), "test",
                          ("question", "choices", "answer"), text=_mmlu_text(subject),
                          choices=lambda d: ["A", "B", "C", "D"],
                          target=lambda d: int(d["answer"]), metrics=("acc",)))
    return {t.name: t for t in tasks}


TASKS = _build_tasks()
ALIASES = {"siqa": "social_iqa", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge"}
GROUPS = {"mmlu": [f"mmlu_{s}" for s in MMLU_SUBJECTS]}


def expand(names: Sequence[str]) -> List[str]:
    """Task names with groups expanded (mmlu -> its subjects), in order, each once."""
    out = []
    for name in names:
        name = ALIASES.get(name, name)
        members = GROUPS.get(name, [name])
        for m in members:
            if m not in TASKS:
                known = ", ".join(sorted([*GROUPS, *(t for t in TASKS
                                                     if not t.startswith("mmlu_"))]))
                raise TaskError(f"unknown task {name!r}; known: {known} (and mmlu_<subject>)")
            if m not in out:
                out.append(m)
    return out


def describe() -> str:
    """The tasks, the files each reads under --task-data-dir and the fields it needs."""
    rows = [(name, f"{t.directory}/{t.split}.*", ", ".join(t.fields))
            for name, t in TASKS.items() if not name.startswith("mmlu_")]
    rows.append(("mmlu", "mmlu/<subject>/test.* (57 subjects)", "question, choices, answer"))
    lines = [f"{'task':<14} {'files (.jsonl, .json, .parquet, or <split>-*.parquet shards)':<62} "
             "fields"]
    lines += [f"{a:<14} {b:<62} {c}" for a, b, c in rows]
    return "\n".join(lines + ["(siqa is social_iqa; mmlu_<subject> runs one subject)"])


# ------------------------------------------------------------------ reading files
def _files(data_dir: str, task: Task) -> List[str]:
    base = os.path.join(data_dir, task.directory)
    found = []
    for ext in ("jsonl", "json", "parquet"):
        found += sorted(glob.glob(os.path.join(base, f"{task.split}.{ext}")))
        found += sorted(glob.glob(os.path.join(base, f"{task.split}-*.{ext}")))
    if not found:
        raise TaskError(f"{task.name}: no {task.split} file in {base} (expected "
                        f"{task.split}.jsonl, {task.split}.json or {task.split}.parquet, or "
                        f"{task.split}-*.parquet shards, with fields {', '.join(task.fields)})")
    return found


def _records(path: str):
    """(where, record) of a JSONL, JSON (a list, or {"data": [...]}) or parquet file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TaskError(f"{path}: reading parquet needs pyarrow (pip install pyarrow, or "
                            "-e .[eval])") from None
        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: record {i + 1}", record
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise TaskError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            return
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    data = data.get("data", data) if isinstance(data, dict) else data
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a list of records (or {{\"data\": [...]}})")
    for i, record in enumerate(data):
        yield f"{path}: record {i + 1}", record


def load(name: str, data_dir: str, limit: Optional[int] = None) -> List[dict]:
    """The task's documents (processed as lm-evaluation-harness processes them), checked:
    a record lacking a field, or whose answer is not among its choices, raises TaskError."""
    task = TASKS[name]
    docs = []
    for path in _files(data_dir, task):
        for where, record in _records(path):
            if limit is not None and len(docs) >= limit:
                return docs
            if not isinstance(record, dict):
                raise TaskError(f"{where}: expected an object with fields "
                                f"{', '.join(task.fields)}")
            missing = [f for f in task.fields if f not in record]
            if missing:
                raise TaskError(f"{where}: no field {missing[0]!r} ({task.name} needs "
                                f"{', '.join(task.fields)})")
            try:
                doc = task.process(record) if task.process else record
                choices, gold = task.choices(doc), task.target(doc)
                task.requests(doc)
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                raise TaskError(f"{where}: {task.name} cannot read it ({type(e).__name__}: "
                                f"{e})") from None
            if not 0 <= gold < len(choices):
                raise TaskError(f"{where}: the answer index {gold} is not among its "
                                f"{len(choices)} choices")
            docs.append(doc)
    return docs


def read_texts(path: str) -> List[str]:
    """Documents of a perplexity file: .jsonl with a "text" key per line, else one per line."""
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]
    if not path.endswith(".jsonl"):
        return [line for _, line in lines]
    texts = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TaskError(f"{path}:{n}: no \"text\" string")
        texts.append(record["text"])
    return texts


# ------------------------------------------------------------------ tokens
def encode(tokenizer, text: str) -> List[int]:
    """Token ids of ``text`` as lm-evaluation-harness encodes it: a Hugging Face tokenizer with
    its own default for special tokens (a BOS where it adds one), others as they tokenize."""
    return list(tokenizer.tokenize(text))


def _prefix_token(tokenizer) -> int:
    """The token an empty context starts from: BOS where the tokenizer has one, else EOD."""
    hf = getattr(tokenizer, "tokenizer", None)
    bos = getattr(hf, "bos_token_id", None) if hf is not None else getattr(tokenizer, "bos",
                                                                          None)
    return bos if isinstance(bos, int) and bos >= 0 else tokenizer.eod


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context move to the
    continuation; the continuation's tokens are those of context + continuation after the
    context's own."""
    if not context:
        ids = encode(tokenizer, continuation)
        prefix = _prefix_token(tokenizer)
        return ([prefix], ids) if ids[:1] != [prefix] else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def requests(name: str, doc) -> List[Tuple[str, str]]:
    return TASKS[name].requests(doc)


# ------------------------------------------------------------------ metrics
def _stderr(values: Sequence[float]) -> Optional[float]:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def score(name: str, docs, lls: List[List[float]]):
    """(metrics, per-example records) from each example's choice log-likelihoods."""
    task = TASKS[name]
    acc, acc_norm, logged = [], [], []
    for d, (doc, ll) in enumerate(zip(docs, lls)):
        gold = task.target(doc)
        pred = int(np.argmax(ll))
        acc.append(float(pred == gold))
        record = {"doc_id": d, "loglikelihoods": ll, "gold": gold, "pred": pred}
        if "acc_norm" in task.metrics:
            lengths = [float(len(c)) for c in task.choices(doc)]
            pred_norm = int(np.argmax(np.array(ll) / np.array(lengths)))
            acc_norm.append(float(pred_norm == gold))
            record["pred_norm"] = pred_norm
        logged.append(record)
    metrics = {"examples": len(docs), "acc": float(np.mean(acc)) if acc else None,
               "acc_stderr": _stderr(acc)}
    if "acc_norm" in task.metrics:
        metrics.update(acc_norm=float(np.mean(acc_norm)) if acc_norm else None,
                       acc_norm_stderr=_stderr(acc_norm))
    return metrics, logged


def groups(names: Sequence[str], results: dict) -> dict:
    """Group rows (mmlu) when all their subjects ran: the size-weighted mean of its subjects
    and their pooled standard error, as lm-evaluation-harness aggregates groups."""
    out = {}
    for group, members in GROUPS.items():
        if not all(m in results for m in members):
            continue
        sizes = [results[m]["examples"] for m in members]
        means = [results[m]["acc"] for m in members]
        errs = [results[m]["acc_stderr"] or 0.0 for m in members]
        out[group] = {"examples": sum(sizes),
                      "acc": sum(m * n for m, n in zip(means, sizes)) / sum(sizes),
                      "acc_stderr": _pooled_stderr(errs, sizes)}
    return out


def _pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-evaluation-harness's pooled_sample_stderr."""
    variance = sum((n - 1) * s ** 2 * n for s, n in zip(stderrs, sizes)) / \
        (sum(sizes) - len(sizes))
    return math.sqrt(variance / sum(sizes))
