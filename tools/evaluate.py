"""Zero-shot evaluation of a checkpoint (or a Hugging Face model) on multiple-choice tasks, as
lm-evaluation-harness 0.4 scores them, and perplexity on a held-out text file.

    python tools/evaluate.py --load runs/quickstart --tasks arc_easy,piqa \\
        --task-data-dir data/tasks --output results.json
    torchrun --nproc_per_node 4 tools/evaluate.py --load ckpt --tasks hellaswag,mmlu \\
        --task-data-dir data/tasks --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2
    python tools/evaluate.py --hf-model runs/quickstart_hf --tasks arc_easy \\
        --task-data-dir data/tasks
    python tools/evaluate.py --load runs/quickstart --perplexity-file held_out.jsonl

Tasks (``--tasks``, comma-separated): arc_easy, arc_challenge, piqa, hellaswag, openbookqa,
winogrande, social_iqa (alias siqa), boolq, mmlu (its 57 subjects, or mmlu_<subject>).
Their data come from local files in the datasets' public layouts (nothing is downloaded):
``--task-data-dir`` holds, per task, the files listed by ``--list-tasks``. Each choice is
scored by the log-likelihood of its text after the task's prompt, with lm-evaluation-harness
0.4's prompts, target delimiters and metrics (acc; acc_norm: log-likelihood divided by the
choice's length in bytes; standard errors of the mean), zero-shot. The choices of a question
share one forward pass, the prompt computed once (evaluation/scoring.py).

The checkpoint loads at the tensor x pipeline layout the run is launched with, whatever
layout saved it. Global rank 0 prints a table and questions/s and writes ``--output`` JSON
(the per-task metrics, and each example's log-likelihoods with ``--log-samples``).
"""

import argparse
import json
import math
import os
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from evaluation import tasks as task_registry  # noqa: E402
from evaluation.scoring import batch_tensors, causal_row, score_requests  # noqa: E402
from run_text_generation import (  # noqa: E402
    UsageError,
    _Parser,
    add_tokenizer_args,
    build_tokenizer,
    initialize_distributed,
)

from megatron.core import ConfigError  # noqa: E402
from megatron.training.checkpoint_layout import (  # noqa: E402
    ModelCheckpoint,
    config_from_args,
    load_model_weights,
    retarget_args,
)
from megatron.training.checkpointing import CheckpointError  # noqa: E402

PROG = "evaluate.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Zero-shot evaluation of a checkpoint.",
                allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--load", default=None, help="checkpoint directory (any TP x PP layout)")
    g.add_argument("--iteration", type=int, default=None,
                   help="the checkpoint to read (default: the tracker file's)")
    g.add_argument("--hf-model", default=None,
                   help="a Hugging Face model directory instead of --load (one process)")
    g = p.add_argument_group("tasks")
    g.add_argument("--tasks", default=None, help="comma-separated task names")
    g.add_argument("--task-data-dir", default=None,
                   help="directory with each task's local files (see --list-tasks)")
    g.add_argument("--list-tasks", action="store_true",
                   help="print the tasks and the files each reads, then exit")
    g.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    g.add_argument("--perplexity-file", default=None,
                   help="also report perplexity on this text (.txt: one document per line; "
                   ".jsonl: a \"text\" key per line)")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="write JSON results here (global rank 0)")
    g.add_argument("--log-samples", action="store_true",
                   help="with --output: each example's log-likelihoods and prediction")
    g = p.add_argument_group("batching")
    g.add_argument("--micro-batch-size", type=int, default=8,
                   help="rows of --seq-length positions per forward pass")
    g.add_argument("--seq-length", type=int, default=None,
                   help="positions per row (default: the checkpoint's --seq-length)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    add_tokenizer_args(p)
    return p.parse_args(argv)


# ------------------------------------------------------------------ checking the inputs
def check_flags(a: argparse.Namespace) -> None:
    if a.list_tasks:
        return
    if (a.load is None) == (a.hf_model is None):
        raise UsageError("pass one model: --load CHECKPOINT or --hf-model DIR.")
    if not a.tasks and not a.perplexity_file:
        raise UsageError("nothing to evaluate: pass --tasks and/or --perplexity-file.")
    if a.tasks and not a.task_data_dir:
        raise UsageError("--tasks needs --task-data-dir (the tasks' local files; "
                         "see --list-tasks).")
    if a.task_data_dir and not os.path.isdir(a.task_data_dir):
        raise UsageError(f"--task-data-dir {a.task_data_dir} is not a directory.")
    if a.perplexity_file and not os.path.isfile(a.perplexity_file):
        raise UsageError(f"--perplexity-file {a.perplexity_file} does not exist.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size
    if a.hf_model and (tp, pp, world) != (1, 1, 1):
        raise UsageError("--hf-model runs in one process (no tensor or pipeline parallelism).")
    if tp * pp != world:
        raise UsageError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size "
                         f"{pp} does not match the {world} process(es) launched; start it "
                         f"with torchrun --nproc_per_node {tp * pp}.")
    for flag, value in (("--limit", a.limit), ("--micro-batch-size", a.micro_batch_size),
                        ("--seq-length", a.seq_length)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} must be at least 1.")
    if a.output and not os.path.isdir(os.path.dirname(os.path.abspath(a.output))):
        raise UsageError(f"--output {a.output}: the directory "
                         f"{os.path.dirname(os.path.abspath(a.output))} does not exist.")


def prepare(a: argparse.Namespace) -> dict:
    """Flags, tasks and their files, checkpoint, layout and tokenizer, all checked before any
    process group or weight. Raises UsageError, CheckpointError, ConfigError,
    task_registry.TaskError."""
    check_flags(a)
    names = task_registry.expand([t.strip() for t in a.tasks.split(",") if t.strip()]) \
        if a.tasks else []
    docs = {name: task_registry.load(name, a.task_data_dir, a.limit) for name in names}
    texts = task_registry.read_texts(a.perplexity_file) if a.perplexity_file else []
    if a.hf_model:
        plan = dict(names=names, docs=docs, texts=texts, **_prepare_hf(a))
        plan["requests"] = tokenized_requests(names, docs, plan["tokenizer"])
        return plan
    reader = ModelCheckpoint(a.load, a.iteration)
    args = retarget_args(reader.args, tensor_model_parallel_size=a.tensor_model_parallel_size,
                         pipeline_model_parallel_size=a.pipeline_model_parallel_size)
    # explicit positions: each packed segment's own (RoPE from position ids as in --sft)
    config = config_from_args(args, hidden_dropout=0.0, attention_dropout=0.0,
                              params_dtype=torch.float32, sequence_parallel=False, sft=True)
    tokenizer = build_tokenizer(a, reader.args)
    seq_length = a.seq_length or args.get("seq_length") or config.max_position_embeddings
    if seq_length > config.max_position_embeddings:
        raise UsageError(f"--seq-length {seq_length} exceeds the model's "
                         f"--max-position-embeddings {config.max_position_embeddings}.")
    vocab_size = min(reader.args.get("true_vocab_size") or tokenizer.vocab_size,
                     tokenizer.vocab_size)
    if vocab_size > args["padded_vocab_size"]:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{args['padded_vocab_size']} embedding rows; pass the tokenizer it "
                         "was trained with.")
    return dict(names=names, docs=docs, texts=texts, reader=reader, args=args, config=config,
                tokenizer=tokenizer, seq_length=seq_length, vocab_size=vocab_size,
                requests=tokenized_requests(names, docs, tokenizer))


def _prepare_hf(a: argparse.Namespace) -> dict:
    if not os.path.isdir(a.hf_model):
        raise UsageError(f"--hf-model {a.hf_model} is not a directory.")
    from megatron.core.tokenizers.huggingface import HuggingFaceTokenizer
    try:
        import transformers
        tokenizer = HuggingFaceTokenizer(a.hf_model)
        config = transformers.AutoConfig.from_pretrained(a.hf_model, local_files_only=True)
    except (ImportError, OSError, ValueError) as e:
        raise UsageError(f"--hf-model {a.hf_model} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}).") from None
    seq_length = a.seq_length or getattr(config, "max_position_embeddings", 2048)
    return dict(tokenizer=tokenizer, seq_length=seq_length, hf_config=config)


# ------------------------------------------------------------------ the model
def build_model(plan: dict):
    """This rank's stage of the model (its tensor-parallel shard), in eval mode, with the
    checkpoint's weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.training.initialize import get_device
    model = GPTModel(plan["config"], plan["args"]["padded_vocab_size"],
                     pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage())
    load_model_weights([model], lambda name: plan["reader"].tensor(name).float())
    return model.to(get_device()).eval()


def megatron_token_losses(model, plan: dict, micro_batch_size: int):
    """rows -> -log p(label) per position [rows, s], through the pipeline schedule when the
    model is split in stages; the last stage's result is broadcast to every rank."""
    import torch.distributed as dist

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.schedules import (
        forward_backward_no_pipelining,
        forward_backward_pipelining,
    )
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.training.initialize import get_device
    device, s, hidden = get_device(), plan["seq_length"], plan["config"].hidden_size
    pp = ps.get_pipeline_model_parallel_world_size()

    vocab = plan["vocab_size"]
    tp_rank = ps.get_tensor_model_parallel_rank()

    def loss_func(labels, logits):
        # the tokenizer's vocabulary only: the padding rows of the output layer are not
        # tokens (the Hugging Face export drops them), so they take no probability
        per_rank = logits.shape[-1]
        first = tp_rank * per_rank
        if first + per_rank > vocab:
            logits = logits.clone()
            logits[..., max(vocab - first, 0):] = float("-inf")
        losses = vocab_parallel_cross_entropy(logits, labels)
        return losses.sum(), {"token_losses": losses}

    def forward_step(data_iterator, model):
        tokens, labels, positions, mask = (t.to(device) for t in next(data_iterator))
        return model(tokens, positions, mask), partial(loss_func, labels)

    def token_losses(rows):
        n = -(-len(rows) // micro_batch_size)
        tensors = batch_tensors(rows, n * micro_batch_size, s)
        micro = iter([tuple(t[k * micro_batch_size:(k + 1) * micro_batch_size]
                            for t in tensors) for k in range(n)])
        with torch.no_grad():
            if pp > 1:
                reported = forward_backward_pipelining(
                    forward_step_func=forward_step, data_iterator=micro, model=model,
                    num_microbatches=n, tensor_shape=(s, micro_batch_size, hidden),
                    dtype=torch.float32, forward_only=True)
            else:
                reported = forward_backward_no_pipelining(
                    forward_step_func=forward_step, data_iterator=micro, model=model,
                    num_microbatches=n, forward_only=True)
        losses = torch.cat([r["token_losses"] for r in reported]) if reported else \
            torch.zeros(n * micro_batch_size, s, device=device)
        if dist.is_initialized() and ps.get_world_size() > 1:
            losses = losses.to(device).contiguous()
            # the first rank of the last stage (ranks run tensor-fastest, then stages)
            dist.broadcast(losses, src=ps.get_tensor_model_parallel_world_size() * (pp - 1))
        return losses[:len(rows)]
    return token_losses


def hf_token_losses(plan: dict, a: argparse.Namespace):
    """rows -> -log p(label) per position for a transformers causal LM (4-D masks and
    explicit positions keep each packed segment to itself)."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.hf_model, local_files_only=True, torch_dtype=torch.float32).eval()
    s = plan["seq_length"]

    def token_losses(rows):
        tokens, labels, positions, mask = batch_tensors(rows, len(rows), s)
        bias = torch.zeros(mask.shape, dtype=torch.float32)
        bias.masked_fill_(mask, torch.finfo(torch.float32).min)
        with torch.no_grad():
            logits = model(input_ids=tokens, attention_mask=bias, position_ids=positions).logits
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels,
                                                 reduction="none")
    return token_losses


# ------------------------------------------------------------------ running
def tokenized_requests(names, docs: dict, tokenizer) -> dict:
    """{task: (requests as (context ids, continuation ids), the example of each)}; a choice
    that gives no tokens raises TaskError naming the task and example."""
    out = {}
    for name in names:
        requests, owners = [], []
        for d, doc in enumerate(docs[name]):
            for k, (context, continuation) in enumerate(task_registry.requests(name, doc)):
                pair = task_registry.encode_pair(tokenizer, context, continuation)
                if not pair[1]:
                    raise task_registry.TaskError(
                        f"{name}: example {d + 1}, request {k + 1}: the continuation "
                        f"{continuation!r} gives no tokens, so it has no log-likelihood")
                requests.append(pair)
                owners.append(d)
        out[name] = (requests, owners)
    return out


def evaluate_tasks(plan: dict, token_losses, a: argparse.Namespace, rank0: bool) -> dict:
    """Per task: metrics and samples; prints a line per task as it finishes."""
    s = plan["seq_length"]
    results, samples, timing = {}, {}, {}
    for name in plan["names"]:
        docs = plan["docs"][name]
        start = time.time()
        requests, owners = plan["requests"][name]
        lls = score_requests(requests, s, a.micro_batch_size, token_losses)
        per_doc = [[] for _ in docs]
        for ll, d in zip(lls, owners):
            per_doc[d].append(float(ll))
        metrics, logged = task_registry.score(name, docs, per_doc)
        seconds = time.time() - start
        results[name], samples[name] = metrics, logged
        timing[name] = (len(docs), seconds)
        if rank0:
            print(f" > {name}: {len(docs)} questions in {seconds:.1f} s "
                  f"({len(docs) / max(seconds, 1e-9):.1f} questions/s)", flush=True)
    results.update(task_registry.groups(plan["names"], results))
    return dict(results=results, samples=samples, timing=timing)


def perplexity(plan: dict, token_losses, a: argparse.Namespace) -> dict:
    """Token perplexity and bits per byte of --perplexity-file: each document after the
    end-of-document token, in windows of --seq-length predictions."""
    texts = plan["texts"]  # read (and checked) before the model was built
    tokenizer, s = plan["tokenizer"], plan["seq_length"]
    windows, total_bytes = [], 0
    for text in texts:
        ids = [tokenizer.eod] + task_registry.encode(tokenizer, text)
        total_bytes += len(text.encode("utf-8"))
        windows += [ids[k:k + s + 1] for k in range(0, len(ids) - 1, s)]
    nll, tokens_scored = 0.0, 0
    for b in range(0, len(windows), a.micro_batch_size):
        rows = [causal_row(w[:-1], w[1:], s) for w in windows[b:b + a.micro_batch_size]]
        tokens_scored += sum(row.spans[0][2] for row in rows)
        losses = token_losses(rows).double().cpu()
        nll += sum(float(losses[r, :row.spans[0][2]].sum()) for r, row in enumerate(rows))
    return {"documents": len(texts), "tokens": tokens_scored, "bytes": total_bytes,
            "perplexity": math.exp(nll / max(tokens_scored, 1)),
            "bits_per_byte": nll / max(total_bytes, 1) / math.log(2)}


def print_table(results: dict, names) -> None:
    header = f"{'task':<28} | {'n':>6} | {'acc':>7} | {'± stderr':>8} | {'acc_norm':>8} | " \
             f"{'± stderr':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, m in results.items():
        def cell(key, width):
            return f"{m[key]:{width}.4f}" if m.get(key) is not None else " " * (width - 1) + "-"
        print(f"{name:<28} | {m['examples']:6d} | {cell('acc', 7)} | "
              f"{cell('acc_stderr', 8)} | {cell('acc_norm', 8)} | {cell('acc_norm_stderr', 8)}")


def write_output(path: str, payload: dict) -> None:
    """JSON, written beside ``path`` and renamed into place when complete."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    from megatron.training.arguments import exit_with_error
    from megatron.training.initialize import destroy_distributed
    try:
        a = parse_args(argv)
        if a.list_tasks:
            print(task_registry.describe())
            return 0
        plan = prepare(a)
    except (UsageError, task_registry.TaskError) as e:
        exit_with_error(str(e), PROG)
    except (CheckpointError, ConfigError) as e:
        exit_with_error(str(e), PROG)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    initialize_distributed(a.tensor_model_parallel_size, a.pipeline_model_parallel_size)
    try:
        if a.hf_model:
            token_losses = hf_token_losses(plan, a)
        else:
            try:
                model = build_model(plan)
            except CheckpointError as e:
                exit_with_error(str(e), PROG)
            token_losses = megatron_token_losses(model, plan, a.micro_batch_size)
        start = time.time()
        out = evaluate_tasks(plan, token_losses, a, rank0) if plan["names"] else \
            dict(results={}, samples={}, timing={})
        questions = sum(n for n, _ in out["timing"].values())
        seconds = time.time() - start
        payload = {"model": a.load or a.hf_model, "results": out["results"],
                   "questions": questions, "seconds": round(seconds, 3),
                   "questions_per_second": round(questions / max(seconds, 1e-9), 3)}
        if a.perplexity_file:
            payload["perplexity"] = perplexity(plan, token_losses, a)
        if rank0:
            if out["results"]:
                print_table(out["results"], plan["names"])
                print(f"\n{questions} questions in {seconds:.1f} s: "
                      f"{payload['questions_per_second']:.1f} questions/s")
            if a.perplexity_file:
                p = payload["perplexity"]
                print(f"perplexity of {a.perplexity_file}: {p['perplexity']:.4f} over "
                      f"{p['tokens']} tokens ({p['documents']} documents); "
                      f"{p['bits_per_byte']:.4f} bits per byte")
            if a.output:
                if a.log_samples:
                    payload["samples"] = out["samples"]
                write_output(a.output, payload)
                print(f" > wrote {a.output}", flush=True)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
