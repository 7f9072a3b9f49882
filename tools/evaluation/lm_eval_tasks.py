"""lm-evaluation-harness 0.4 task configs that read the same local files as tools/evaluate.py.

    python tools/evaluation/lm_eval_tasks.py --task-data-dir data/tasks --output-dir lm_eval_tasks
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=runs/quickstart_hf,dtype=float32 --include_path lm_eval_tasks \\
        --tasks local_arc_easy,local_piqa --device cpu --batch_size 8

Each config includes lm-evaluation-harness's own task file (its prompts, choices, targets and
metrics, found in the installed ``lm_eval`` package) and replaces only where the documents come
from: ``dataset_path: json`` (or parquet) with the file under --task-data-dir, and no
training or few-shot split (zero-shot). The tasks are named ``local_<task>``; ``local_mmlu``
groups whichever mmlu subjects have files, size-weighted as lm-evaluation-harness's mmlu.
Needs no lm_eval import when ``--lm-eval-tasks-dir`` is given.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.tasks import TASKS, TaskError, _files  # noqa: E402

SOURCES = {  # our task: its file in lm_eval/tasks
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "winogrande": "winogrande/default.yaml",
    "social_iqa": "siqa/siqa.yaml", "boolq": "super_glue/boolq/default.yaml",
}


def _source(name: str) -> str:
    if name.startswith("mmlu_"):
        return f"mmlu/default/{name}.yaml"
    return SOURCES[name]


def _yaml(name: str, include: str, files) -> str:
    task = TASKS[name]
    kind = "parquet" if files[0].endswith(".parquet") else "json"
    listed = "\n".join(f"      - {os.path.abspath(f)}" for f in files)
    splits = {"test": "test_split: test\nvalidation_split: null",
              "validation": "validation_split: validation\ntest_split: null"}[task.split]
    return (f"include: {include}\ntask: local_{name}\ntag: []\ndataset_path: {kind}\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    {task.split}:\n"
            f"{listed}\ntraining_split: null\nfewshot_split: null\n{splits}\n")


def write_configs(task_data_dir: str, output_dir: str, lm_eval_tasks_dir: str, names=None):
    """One YAML per task with files under ``task_data_dir`` (all known tasks unless ``names``);
    returns the task names written (local_mmlu when any mmlu subject is)."""
    os.makedirs(output_dir, exist_ok=True)
    written, subjects = [], []
    for name in names or TASKS:
        try:
            files = _files(task_data_dir, TASKS[name])
        except TaskError:
            if names:
                raise
            continue
        if len({f.endswith(".parquet") for f in files}) > 1:
            raise TaskError(f"{name}: mixes parquet and JSON files; lm-evaluation-harness "
                            "reads one kind per task")
        include = os.path.abspath(os.path.join(lm_eval_tasks_dir, _source(name)))
        with open(os.path.join(output_dir, f"local_{name}.yaml"), "w") as f:
            f.write(_yaml(name, include, files))
        (subjects if name.startswith("mmlu_") else written).append(f"local_{name}")
    if subjects:
        with open(os.path.join(output_dir, "_local_mmlu.yaml"), "w") as f:
            f.write("group: local_mmlu\ntask:\n" + "".join(f"  - {s}\n" for s in subjects) +
                    "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
                    "metadata:\n  version: 2\n")
        written += subjects + ["local_mmlu"]
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task-data-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--lm-eval-tasks-dir", default=None,
                   help="lm_eval/tasks of the lm-evaluation-harness installation (default: "
                   "the importable lm_eval's)")
    a = p.parse_args(argv)
    tasks_dir = a.lm_eval_tasks_dir
    if tasks_dir is None:
        try:
            import lm_eval.tasks
        except ImportError:
            p.error("lm_eval is not importable here; pass --lm-eval-tasks-dir")
        tasks_dir = os.path.dirname(lm_eval.tasks.__file__)
    names = write_configs(a.task_data_dir, a.output_dir, tasks_dir)
    print(f"wrote {len(names)} task configs to {a.output_dir}: {','.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
