"""Generate text from a checkpoint saved at any tensor x pipeline layout, with Megatron-LM's
flags.

    python tools/run_text_generation.py --load ckpt --prompt "Once upon a time" \\
        --max-new-tokens 64 --top-p 0.9 --temperature 0.8 --seed 1
    torchrun --nproc_per_node 2 tools/run_text_generation.py --load ckpt \\
        --tensor-model-parallel-size 2 --prompts-file prompts.jsonl --greedy \\
        --out-seq-length 128 --output results.jsonl

The model is built at --tensor-model-parallel-size (the number of processes; no pipeline
parallelism) and filled from the checkpoint's whole tensors, re-split for that size. Prompts
are generated --micro-batch-size at a time with a key/value cache; global rank 0 prints each
prompt and its continuation and, with --output, writes JSONL lines {"prompt", "completion",
"tokens"} ("tokens": the new token ids, ending with the end-of-document id when generation
stopped there; "completion": their text without it).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.core import ConfigError  # noqa: E402
from megatron.training.checkpoint_layout import (  # noqa: E402
    ModelCheckpoint,
    config_from_args,
    load_model_weights,
    retarget_args,
)
from megatron.training.checkpointing import CheckpointError  # noqa: E402

PROG = "run_text_generation.py"
from megatron.core.tokenizers import TOKENIZER_ARGS as TOKENIZER_FLAGS  # noqa: E402


class UsageError(Exception):
    """A flag, prompt or file that cannot work; the message is one sentence naming it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message[0].upper() + message[1:] + ".")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Generate text from a Megatron checkpoint.",
                allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint directory (any TP x PP layout)")
    p.add_argument("--iteration", type=int, default=None,
                   help="the checkpoint to read (default: the tracker file's)")
    g = p.add_argument_group("prompts and output")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", action="append", default=[],
                   help='one prompt per line, or JSONL with a "prompt" or "text" key '
                   '(repeatable)')
    g.add_argument("--output", default=None, help="write JSONL results here (global rank 0)")
    g.add_argument("--micro-batch-size", type=int, default=8, help="prompts generated at once")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", "--out-seq-length", dest="max_new_tokens", type=int,
                   required=True, help="tokens to generate per prompt (at most)")
    g.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0,
                   help="sample among the k most likely tokens (0: all)")
    g.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.0,
                   help="sample from the smallest set whose probability exceeds p (0: off)")
    g.add_argument("--seed", type=int, default=1234,
                   help="sampling seed; micro-batch i uses seed + i")
    g.add_argument("--no-kv-cache", dest="use_kv_cache", action="store_false",
                   help="recompute the whole sequence at every step (slower, same tokens)")
    g.add_argument("--ignore-eod", dest="stop_on_eod", action="store_false",
                   help="do not stop at the end-of-document token")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="tensor-parallel ranks: the number of processes torchrun starts")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="only 1: generation runs without pipeline parallelism")
    add_tokenizer_args(p)
    return p.parse_args(argv)


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    """The tokenizer flags of the tools that read a checkpoint (evaluate.py too)."""
    g = p.add_argument_group("tokenizer (each overrides the checkpoint's stored value)")
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None)


def check_flags(a: argparse.Namespace) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.pipeline_model_parallel_size != 1:
        raise UsageError(f"--pipeline-model-parallel-size {a.pipeline_model_parallel_size} is "
                         "not supported: text generation runs without pipeline parallelism "
                         "(a checkpoint saved at any layout loads at size 1).")
    if a.tensor_model_parallel_size != world:
        raise UsageError(f"--tensor-model-parallel-size {a.tensor_model_parallel_size} does not "
                         f"match the {world} process(es) launched; start it with torchrun "
                         f"--nproc_per_node {a.tensor_model_parallel_size}.")
    for flag, ok, expected in (("--max-new-tokens", a.max_new_tokens >= 1, "at least 1"),
                               ("--temperature", a.temperature > 0.0, "positive"),
                               ("--top-k", a.top_k >= 0, "at least 0"),
                               ("--top-p", 0.0 <= a.top_p <= 1.0, "in [0, 1]"),
                               ("--micro-batch-size", a.micro_batch_size >= 1, "at least 1")):
        if not ok:
            value = getattr(a, flag[2:].replace("-", "_"))
            raise UsageError(f"{flag} {value} must be {expected}.")
    if a.output and not os.path.isdir(os.path.dirname(os.path.abspath(a.output))):
        raise UsageError(f"--output {a.output}: the directory "
                         f"{os.path.dirname(os.path.abspath(a.output))} does not exist.")


def read_prompts(a: argparse.Namespace) -> list:
    """--prompt values, then each --prompts-file's prompts (JSONL when its first line is an
    object, else one prompt per non-empty line)."""
    prompts = list(a.prompt)
    for path in a.prompts_file:
        if not os.path.isfile(path):
            raise UsageError(f"--prompts-file {path} does not exist.")
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]
        if lines and lines[0][1].lstrip().startswith("{"):
            prompts += [_jsonl_prompt(path, n, line) for n, line in lines]
        else:
            prompts += [line for _, line in lines]
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def _jsonl_prompt(path: str, n: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{n} is not JSON ({e.msg}).") from None
    text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise UsageError(f'{path}:{n} has no "prompt" or "text" string.')
    return text


def build_tokenizer(a: argparse.Namespace, stored: dict):
    """The tokenizer from the flags, each missing one taken from the checkpoint's args."""
    from megatron.core.tokenizers import build_tokenizer_from
    try:
        return build_tokenizer_from({k: getattr(a, k) for k in TOKENIZER_FLAGS}, stored)
    except ConfigError as e:
        reason = _as_flags(str(e)).rstrip(".")
        raise UsageError(f"cannot build the tokenizer: {reason} (values not given as flags "
                         "come from the checkpoint's stored arguments).") from None


def _as_flags(message: str) -> str:
    from megatron.training.arguments import config_error_to_flags
    return config_error_to_flags(message, argparse.Namespace(**{k: None for k in (
        *TOKENIZER_FLAGS, "tensor_model_parallel_size", "pipeline_model_parallel_size")}))


def prepare(a: argparse.Namespace) -> dict:
    """Everything a user can get wrong, checked before any process group or weight: flags,
    checkpoint, layout, tokenizer, prompts. Raises UsageError, CheckpointError, ConfigError."""
    check_flags(a)
    prompts = read_prompts(a)
    reader = ModelCheckpoint(a.load, a.iteration)
    args = retarget_args(reader.args, tensor_model_parallel_size=a.tensor_model_parallel_size)
    config = config_from_args(args, hidden_dropout=0.0, attention_dropout=0.0,
                              params_dtype=torch.float32, sequence_parallel=False)
    tokenizer = build_tokenizer(a, reader.args)
    stored = reader.args.get("true_vocab_size") or tokenizer.vocab_size
    vocab_size = min(stored, tokenizer.vocab_size)
    if vocab_size > args["padded_vocab_size"]:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{args['padded_vocab_size']} embedding rows; pass the tokenizer it "
                         "was trained with.")
    tokens = [tokenizer.tokenize(text) for text in prompts]
    for i, ids in enumerate(tokens, 1):
        if not ids:
            raise UsageError(f"prompt {i} ({prompts[i - 1]!r}) gives no tokens.")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(f"prompt {i} holds token id {bad[0]}, outside the model's "
                             f"vocabulary of {vocab_size} tokens.")
    longest = max(len(ids) for ids in tokens)
    if longest + a.max_new_tokens > config.max_position_embeddings:
        raise UsageError(f"the longest prompt ({longest} tokens) plus --max-new-tokens "
                         f"{a.max_new_tokens} exceeds the model's --max-position-embeddings "
                         f"{config.max_position_embeddings}; shorten it or generate fewer.")
    return dict(reader=reader, args=args, config=config, tokenizer=tokenizer, prompts=prompts,
                tokens=tokens, vocab_size=vocab_size, stored_vocab_size=stored)


def initialize_distributed(tp: int, pp: int = 1) -> None:
    """Join torchrun's process group (when launched by it) and build the tensor- (and
    pipeline-) parallel groups; a plain `python` run stays one process without
    torch.distributed."""
    import torch.distributed as dist

    from megatron.core import parallel_state
    if "WORLD_SIZE" not in os.environ:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    parallel_state.initialize_model_parallel(tp, pp)


def build_model(plan: dict):
    """This rank's tensor-parallel shard of the model, in eval mode, with the checkpoint's
    weights (no communication)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training.initialize import get_device
    model = GPTModel(plan["config"], plan["args"]["padded_vocab_size"])
    load_model_weights([model], lambda name: plan["reader"].tensor(name).float())
    return model.to(get_device()).eval()


def run(a: argparse.Namespace, plan: dict, model) -> list:
    """Generate every prompt, micro-batch by micro-batch; global rank 0 prints them."""
    from megatron.core.inference import generate
    from megatron.core.parallel_state import get_global_rank
    tokenizer, eod = plan["tokenizer"], getattr(plan["tokenizer"], "eod", None)
    rank0 = get_global_rank() == 0
    results, size = [], a.micro_batch_size
    batches = (len(plan["prompts"]) + size - 1) // size
    for b in range(batches):
        start = time.time()
        batch = plan["tokens"][b * size:(b + 1) * size]
        new = generate(model, batch, a.max_new_tokens, eod=eod, vocab_size=plan["vocab_size"],
                       greedy=a.greedy, temperature=a.temperature, top_k=a.top_k,
                       top_p=a.top_p, seed=a.seed + b, use_kv_cache=a.use_kv_cache,
                       stop_on_eod=a.stop_on_eod)
        for i, ids in enumerate(new):
            text = plan["prompts"][b * size + i]
            shown = ids[:-1] if ids and a.stop_on_eod and ids[-1] == eod else ids
            results.append({"prompt": text, "completion": tokenizer.detokenize(shown),
                            "tokens": ids})
            if rank0:
                n = b * size + i + 1
                print(f"[{n}/{len(plan['prompts'])}] prompt: {text}\n"
                      f"[{n}/{len(plan['prompts'])}] completion: {results[-1]['completion']}",
                      flush=True)
        if rank0:
            count = sum(len(ids) for ids in new)
            seconds = time.time() - start
            print(f" > micro-batch {b + 1}/{batches}: {len(batch)} prompts, {count} new tokens "
                  f"in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} tokens/s)", flush=True)
    return results


def write_output(path: str, results: list) -> None:
    """JSONL, written beside ``path`` and renamed into place when complete."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in results:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _describe(a: argparse.Namespace, plan: dict) -> None:
    saved, args = plan["reader"].args, plan["args"]
    print(f" > loading {a.load} (iteration {plan['reader'].iteration}): "
          f"{args['norm_placement']} placement, {args['num_layers']} layers, hidden "
          f"{args['hidden_size']}, saved at TP={saved.get('tensor_model_parallel_size', 1)} x "
          f"PP={saved.get('pipeline_model_parallel_size', 1)}, running at "
          f"TP={a.tensor_model_parallel_size}", flush=True)
    if plan["stored_vocab_size"] != plan["tokenizer"].vocab_size:
        print(f" > warning: the tokenizer has {plan['tokenizer'].vocab_size} tokens and the "
              f"checkpoint was trained on {plan['stored_vocab_size']}; generating among the "
              f"first {plan['vocab_size']}", flush=True)


def main(argv=None) -> int:
    from megatron.training.arguments import exit_with_error
    from megatron.training.initialize import destroy_distributed
    try:
        a = parse_args(argv)
        plan = prepare(a)
    except UsageError as e:
        exit_with_error(str(e), PROG)
    except (CheckpointError, ConfigError) as e:
        exit_with_error(_as_flags(str(e)), PROG)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        _describe(a, plan)
    initialize_distributed(a.tensor_model_parallel_size)
    try:
        try:
            model = build_model(plan)
        except CheckpointError as e:  # a tensor of the wrong shape: every rank finds it
            exit_with_error(str(e), PROG)
        results = run(a, plan, model)
        if a.output and rank0:
            write_output(a.output, results)
            print(f" > wrote {len(results)} results to {a.output}", flush=True)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
