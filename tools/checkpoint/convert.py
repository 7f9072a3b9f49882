"""Convert checkpoints between layouts and to and from Hugging Face, with Megatron-LM's
converter interface.

    python tools/checkpoint/convert.py --model-type GPT --loader megatron --saver hf \\
        --load-dir ckpt --save-dir hf_model                 # -> AutoModelForCausalLM
    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver megatron \\
        --load-dir hf_model --save-dir ckpt_tp2 --target-tensor-parallel-size 2
    python tools/checkpoint/convert.py --model-type GPT --loader megatron --saver megatron \\
        --load-dir ckpt --save-dir ckpt_pp2 --target-pipeline-parallel-size 2

One process on a CPU; the source is memory-mapped and read one tensor at a time. Output is
written to a temporary directory beside --save-dir and moved into place only when complete
(and verified), so a failed conversion leaves nothing behind.
"""

import argparse
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

from megatron.core import ConfigError  # noqa: E402
from megatron.training.checkpointing import CheckpointError  # noqa: E402

LOADERS = {"megatron": "megatron", "mcore": "megatron", "core": "megatron", "legacy": "megatron",
           "hf": "hf", "llama_mistral": "hf"}
SAVERS = {"megatron": "megatron", "mcore": "megatron", "core": "megatron", "legacy": "megatron",
          "hf": "hf"}


# Layout fields as the target flags name them (for error messages).
TARGET_FLAGS = {
    "tensor_model_parallel_size": "--target-tensor-parallel-size",
    "pipeline_model_parallel_size": "--target-pipeline-parallel-size",
    "num_layers_per_virtual_pipeline_stage": "--target-num-layers-per-virtual-pipeline-stage",
    "decoder_first_pipeline_num_layers": "--target-decoder-first-pipeline-num-layers",
    "decoder_last_pipeline_num_layers": "--target-decoder-last-pipeline-num-layers",
}


class ConversionError(Exception):
    """A conversion that cannot be done; the message is one sentence naming the path."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Convert GPT checkpoints (Megatron <-> Hugging Face, "
                                "any parallel layout)", allow_abbrev=False)
    p.add_argument("--model-type", required=True, choices=["GPT"])
    p.add_argument("--loader", required=True, choices=sorted(LOADERS),
                   help="megatron: this codebase's checkpoint; hf: a Llama/Qwen3/Glm4 directory")
    p.add_argument("--saver", required=True, choices=sorted(SAVERS))
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--iteration", type=int, default=None,
                   help="the checkpoint to read (default: the tracker file's)")
    p.add_argument("--overwrite", action="store_true", help="replace a model in --save-dir")
    g = p.add_argument_group("megatron saver: the target layout")
    g.add_argument("--target-tensor-parallel-size", type=int, default=1)
    g.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    g.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--target-decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--target-decoder-last-pipeline-num-layers", type=int, default=None)
    g = p.add_argument_group("hf saver")
    g.add_argument("--max-shard-size", default="5GB",
                   help="split model.safetensors into shards of at most this size")
    g.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare logits and greedy continuations of both models before "
                   "reporting success (default: on)")
    g.add_argument("--verify-tolerance", type=float, default=1e-3,
                   help="largest |logit difference| (fp32) --verify accepts")
    g = p.add_argument_group("tokenizer (default: the checkpoint's stored arguments)")
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g = p.add_argument_group("accepted for Megatron-LM compatibility (no effect)")
    g.add_argument("--megatron-path", default=None, help=argparse.SUPPRESS)
    g.add_argument("--max-queue-size", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--no-checking", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def log(message: str) -> None:
    print(message, flush=True)


def _progress(total: int, what: str):
    """A callback advancing a tqdm bar (when installed) by one tensor."""
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=what, unit="tensor", leave=False, file=sys.stderr,
                   disable=not sys.stderr.isatty())
        return lambda _name: bar.update(1), bar.close
    except ImportError:
        return None, lambda: None


def check_save_dir(save_dir: str, overwrite: bool) -> None:
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ConversionError(f"--save-dir {save_dir} is a file.")
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not overwrite:
        raise ConversionError(f"--save-dir {save_dir} already holds files "
                              f"({', '.join(sorted(os.listdir(save_dir))[:3])}); pass "
                              "--overwrite to replace them.")


def build_tokenizer(a, stored: dict):
    """Our tokenizer from the flags, each one not given taken from the checkpoint's stored
    arguments."""
    from megatron.core.tokenizers import TOKENIZER_ARGS, build_tokenizer_from
    try:
        return build_tokenizer_from({k: getattr(a, k) for k in TOKENIZER_ARGS}, stored)
    except ConfigError as e:
        raise ConversionError(f"cannot build the tokenizer: {e} Flags not given come from the "
                              "checkpoint's stored arguments; pass --tokenizer-type and "
                              "--tokenizer-model (or --vocab-file and --merge-file) to point "
                              "at it.") from None


def open_source(a):
    if LOADERS[a.loader] == "megatron":
        from megatron.training.checkpoint_layout import open_model_checkpoint
        source = open_model_checkpoint(a.load_dir, a.iteration)
        s = source.args
        log(f"loaded {a.load_dir} (iteration {source.iteration}): {s['norm_placement']} "
            f"placement, {s['num_layers']} layers, hidden {s['hidden_size']}, saved at "
            f"TP={s.get('tensor_model_parallel_size', 1)} x "
            f"PP={s.get('pipeline_model_parallel_size', 1)}"
            + (f" with {s['virtual_pipeline_model_parallel_size']} virtual stages"
               if s.get("virtual_pipeline_model_parallel_size") else ""))
        return source
    if a.iteration is not None:
        raise ConversionError("--iteration applies to --loader megatron only.")
    from hf_import import HFCheckpoint
    source = HFCheckpoint(a.load_dir)
    log(f"loaded {source.hf_config['architectures'][0]} from {a.load_dir}: "
        f"{source.args['num_layers']} layers, hidden {source.args['hidden_size']}, as "
        f"{source.args['norm_placement']} placement")
    return source


def save_megatron(a, source, tmp: str) -> dict:
    from megatron.training.checkpoint_layout import retarget_args, save_model_checkpoint
    try:
        args = retarget_args(source.args, a.target_tensor_parallel_size,
                             a.target_pipeline_parallel_size,
                             a.target_num_layers_per_virtual_pipeline_stage,
                             a.target_decoder_first_pipeline_num_layers,
                             a.target_decoder_last_pipeline_num_layers)
    except ConfigError as e:
        message = str(e)
        for field, flag in TARGET_FLAGS.items():
            message = message.replace(f"{field}=", f"{flag} ")
        raise ConversionError(f"the target layout does not fit the model: {message}") from None
    if LOADERS[a.loader] == "hf":
        final = os.path.abspath(a.save_dir)
        if source.copy_tokenizer(os.path.join(tmp, "tokenizer")):
            args.update(tokenizer_type="HuggingFaceTokenizer",
                        tokenizer_model=os.path.join(final, "tokenizer"))
    step, done = _progress(len(source.names), "writing")
    release = LOADERS[a.loader] == "hf"
    # a Megatron re-layout keeps the optimizer state, schedule and data position
    save_model_checkpoint(tmp, None if release else source.iteration, args, source.tensor, step,
                          training_state=None if release else source)
    done()
    kept = " with its optimizer state" if not release and getattr(
        source, "has_optimizer_state", False) else ""
    log(f"wrote {'a release' if release else f'the iteration {source.iteration}'} checkpoint"
        f"{kept} at "
        f"TP={args['tensor_model_parallel_size']} x PP={args['pipeline_model_parallel_size']}"
        + (f" ({args['virtual_pipeline_model_parallel_size']} virtual stages)"
           if args.get("virtual_pipeline_model_parallel_size") else "")
        + f", padded vocabulary {args['padded_vocab_size']}")
    return args


def verify_megatron(a, source, tmp: str, args: dict, tokenizer) -> None:
    """Read the written checkpoint back: every tensor equals the source's; against a
    Hugging Face source, the logits and greedy continuation too."""
    import torch

    from megatron.training.checkpoint_layout import VOCAB_TENSORS, ModelCheckpoint, fit_vocab
    written = ModelCheckpoint(tmp)
    if hasattr(source, "rewind"):
        source.rewind()
    count = 0
    for name in source.names:
        fields = ["param"] + (written.fields(name) if hasattr(source, "fields") else [])
        for field in fields:
            mine = written.tensor(name, field)
            theirs = source.tensor(name) if field == "param" else source.tensor(name, field)
            if name in VOCAB_TENSORS:  # re-padded for the target's tensor-parallel size
                theirs = fit_vocab(theirs, mine.shape[0])
            if not torch.equal(mine, theirs.to(mine.dtype)):
                what = name if field == "param" else f"{name} ({field})"
                raise ConversionError(f"verification failed: {what} differs after writing "
                                      f"(max difference {(mine - theirs).abs().max():.3g}).")
            count += 1
    log(f"verify: all {count} tensors read back identical"
        + (" (weights and optimizer state)" if count > len(source.names) else ""))
    if LOADERS[a.loader] == "hf":
        written.rewind()
        _report(a, __import__("hf_verify").compare(
            args, written.tensor, a.load_dir, False, source.true_vocab_size, tokenizer))


def save_hf(a, source, tmp: str, tokenizer):
    from hf_export import write_hf_model
    from safetensors_io import parse_size
    try:
        max_shard = parse_size(a.max_shard_size)
    except ValueError as e:
        raise ConversionError(f"--max-shard-size: {e}.") from None
    step, done = _progress(len(source.names), "exporting")
    try:
        info = write_hf_model(source, tokenizer, tmp, max_shard, step)
    except ValueError as e:  # a tokenizer or model the export cannot take, named
        raise ConversionError(str(e)) from None
    done()
    size = sum(os.path.getsize(os.path.join(tmp, f)) for f in info["files"])
    log(f"wrote {info['architecture']}"
        + (f" (trust_remote_code: {info['reason']})" if info["remote"] else "")
        + f": {len([f for f in info['files'] if f.endswith('.safetensors')])} safetensors "
        f"file(s), {size / 1e6:.1f} MB, vocabulary {info['vocab_size']} (padded "
        f"{source.padded_vocab_size} in the checkpoint)"
        + ("" if info["tokenizer_files"] else "; no tokenizer files (NullTokenizer)"))
    return info


def _report(a, result: dict) -> None:
    agree = "agree" if result["greedy_agree"] else "DIFFER"
    log(f"verify: max |logit difference| {result['max_abs_diff']:.3g} (largest |logit| "
        f"{result['max_abs_logit']:.3g}) over {result['tokens']} tokens in fp32; greedy "
        f"continuations of {result['steps']} tokens {agree}")
    if result["max_abs_diff"] > a.verify_tolerance or not result["greedy_agree"]:
        raise ConversionError(
            f"verification failed: the converted model does not reproduce the source "
            f"(max |logit difference| {result['max_abs_diff']:.3g} > --verify-tolerance "
            f"{a.verify_tolerance:g}, or greedy continuations differ); nothing was written.")


def move_into_place(tmp: str, save_dir: str) -> None:
    old = None
    if os.path.isdir(save_dir):
        old = save_dir.rstrip("/") + f".old-{os.getpid()}"
        os.rename(save_dir, old)
    os.rename(tmp, save_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def convert(a) -> None:
    loader, saver = LOADERS[a.loader], SAVERS[a.saver]
    if loader == "hf" and saver == "hf":
        raise ConversionError("--loader hf --saver hf has nothing to convert; use --saver "
                              "megatron.")
    check_save_dir(a.save_dir, a.overwrite)
    if saver == "hf" or a.verify:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ConversionError("--saver hf and --verify need transformers: pip install -e "
                                  "'.[hf]' (or pass --no-verify).") from None
    source = open_source(a)
    tokenizer = None
    if loader == "megatron" and (saver == "hf" or a.tokenizer_type):
        tokenizer = build_tokenizer(a, source.args)
    parent = os.path.dirname(os.path.abspath(a.save_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(a.save_dir))}"
                               f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        start = time.time()
        if saver == "megatron":
            args = save_megatron(a, source, tmp)
            if a.verify:
                verify_megatron(a, source, tmp, args, _hf_tokenizer(tmp, args))
        else:
            info = save_hf(a, source, tmp, tokenizer)
            if a.verify:
                import hf_verify
                source.rewind()
                _report(a, hf_verify.compare(source.args, source.tensor, tmp, info["remote"],
                                             info["vocab_size"], tokenizer))
        move_into_place(tmp, a.save_dir)
        log(f"done in {time.time() - start:.1f} s: {a.save_dir}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hf_tokenizer(tmp: str, args: dict):
    """The tokenizer copied from a Hugging Face source, for --verify's sample text."""
    path = os.path.join(tmp, "tokenizer")
    if args.get("tokenizer_type") != "HuggingFaceTokenizer" or not os.path.isdir(path):
        return None
    from megatron.core.tokenizers import build_tokenizer as build
    try:
        return build("HuggingFaceTokenizer", tokenizer_model=path)
    except ConfigError:
        return None


def main(argv=None) -> int:
    from hf_import import HFImportError
    a = parse_args(argv)
    try:
        convert(a)
    except (ConversionError, CheckpointError, ConfigError, HFImportError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
