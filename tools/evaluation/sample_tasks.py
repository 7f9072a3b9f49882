"""Made-up task files in each dataset's public layout (Hugging Face's fields), for the
evaluation tests and tools/benchmark_evaluate.py: every task, JSONL, JSON or parquet."""

import json
import os
import random

WORDS = ("the a water cup list value sorted copy returns number file open closes reads "
         "writes line string key dict maps function call object returns new old").split()


def _s(rng, lo=3, hi=9):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _arc(rng, i):
    labels = ["A", "B", "C", "D"] if i % 3 else ["1", "2", "3", "4"]
    return {"id": f"q{i}", "question": _s(rng).capitalize() + "?",
            "choices": {"text": [_s(rng, 1, 4) for _ in labels], "label": labels},
            "answerKey": rng.choice(labels)}


def _hellaswag(rng, i):
    return {"ind": i, "activity_label": _s(rng, 1, 2).title(),
            "ctx_a": _s(rng) + ".", "ctx_b": _s(rng, 2, 4), "ctx": "",
            "endings": [_s(rng, 2, 7) + (" [title] more" if k == 1 else "") for k in range(4)],
            "source_id": "x", "split": "val", "split_type": "indomain",
            "label": str(rng.randrange(4))}


def _winogrande(rng, i):
    return {"sentence": f"{_s(rng).capitalize()} _ {_s(rng, 2, 5)}.",
            "option1": _s(rng, 1, 2), "option2": _s(rng, 1, 2),
            "answer": rng.choice(["1", "2"])}


MAKERS = {
    "arc_easy": ("test", _arc),
    "arc_challenge": ("test", _arc),
    "piqa": ("validation", lambda rng, i: {"goal": _s(rng).capitalize(), "sol1": _s(rng),
                                           "sol2": _s(rng), "label": rng.randrange(2)}),
    "hellaswag": ("validation", _hellaswag),
    "openbookqa": ("test", lambda rng, i: {
        "id": str(i), "question_stem": _s(rng).capitalize(),
        "choices": {"text": [_s(rng, 1, 4) for _ in range(4)], "label": list("ABCD")},
        "answerKey": rng.choice("ABCD")}),
    "winogrande": ("validation", _winogrande),
    "social_iqa": ("validation", lambda rng, i: {
        "context": _s(rng).capitalize() + ".", "question": _s(rng, 2, 5) + "?",
        "answerA": _s(rng, 1, 4), "answerB": _s(rng, 1, 4), "answerC": _s(rng, 1, 4),
        "label": rng.choice(["1", "2", "3"])}),
    "boolq": ("validation", lambda rng, i: {"question": _s(rng), "passage": _s(rng, 8, 20),
                                            "idx": i, "label": rng.randrange(2)}),
    "mmlu/anatomy": ("test", lambda rng, i: {
        "question": _s(rng).capitalize() + "?", "subject": "anatomy",
        "choices": [_s(rng, 1, 3) for _ in range(4)], "answer": rng.randrange(4)}),
}


def write_task_data(root: str, n: int = 6, seed: int = 0, formats=None) -> str:
    """Every task's file under ``root`` (JSONL unless ``formats`` = {task: "json" |
    "parquet"} says otherwise); returns ``root``."""
    rng = random.Random(seed)
    for task, (split, make) in MAKERS.items():
        records = [make(rng, i) for i in range(n)]
        directory = os.path.join(root, task)
        os.makedirs(directory, exist_ok=True)
        fmt = (formats or {}).get(task, "jsonl")
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(records),
                           os.path.join(directory, f"{split}-00000-of-00001.parquet"))
        elif fmt == "json":
            with open(os.path.join(directory, f"{split}.json"), "w") as f:
                json.dump(records, f)
        else:
            with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    return root
