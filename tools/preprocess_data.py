"""Tokenize a corpus into Megatron's .bin/.idx datasets, one per JSON key.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --append-eod --workers 8

Input: JSONL (also .jsonl.gz), or plain text (.txt, one document per line). Output:
``<prefix>_<key>_document.{bin,idx}`` (``_sentence`` with --split-sentences), written under
temporary names and renamed only when complete. The input is streamed (memory does not
grow with its size) and tokenized by --workers processes. A line that is not JSON, lacks a
key or is not UTF-8 stops the run with file:line and the reason (nothing is left that looks
finished), or with --skip-invalid is skipped, counted and reported. Empty documents are
skipped and counted. Needs neither torch nor the model code, so it starts in a blink.

``--chat``: each line is a fine-tuning conversation (``{"messages": [...]}`` or
``{"prompt", "response"}``, see megatron/core/datasets/sft_dataset.py), tokenized with the
chat template; the output is ``<prefix>_conversations_document`` (the tokens) and
``<prefix>_conversations_document_loss_mask`` (1 on the assistant's tokens), which
``pretrain_gpt.py --sft --data-path <prefix>_conversations_document`` reads. A malformed
conversation (no assistant turn, an unknown role, ...) stops the run with file:line.
"""

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from megatron.core import ConfigError
from megatron.core.datasets.conversations import (
    CHAT_DATASET,
    LOSS_MASK_SUFFIX,
    SFTDataError,
    conversation_of,
    tokenize_conversation,
)
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, optimal_dtype
from megatron.core.datasets.sentences import split_sentences
from megatron.core.tokenizers import TOKENIZER_TYPES, build_tokenizer

LINES_PER_TASK = 64


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Tokenize a corpus into Megatron .bin/.idx files.",
                                allow_abbrev=False)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="JSONL, .jsonl.gz, or .txt (one document "
                   "per line)")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to extract from each JSON line (one dataset per key)")
    g.add_argument("--split-sentences", action="store_true",
                   help="store each sentence as its own sequence")
    g.add_argument("--keep-newlines", action="store_true",
                   help="with --split-sentences, keep newlines inside the sentences")
    g.add_argument("--chat", action="store_true",
                   help="lines are fine-tuning conversations: write their tokens and their "
                   "loss masks (for pretrain_gpt.py --sft)")
    g.add_argument("--skip-invalid", action="store_true",
                   help="skip (and count) lines that are not valid JSON/UTF-8 or lack a key, "
                   "instead of stopping")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=list(TOKENIZER_TYPES))
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    g.add_argument("--partitions", type=int, default=1,
                   help="process the input as this many parts in parallel, then merge them "
                   "(the output is the same as with one)")
    g.add_argument("--log-interval", type=int, default=1000,
                   help="documents between progress updates")
    args = p.parse_args(argv)
    if args.workers < 1 or args.partitions < 1 or args.log_interval < 1:
        p.error("--workers, --partitions and --log-interval must be at least 1")
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input} does not exist")
    return args


class Encoder:
    """Runs in each worker: decodes, parses and tokenizes batches of input lines."""

    def __init__(self, args):
        self.args = args

    def initializer(self):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
        a = self.args
        Encoder.tokenizer = build_tokenizer(a.tokenizer_type, vocab_file=a.vocab_file,
                                            merge_file=a.merge_file,
                                            tokenizer_model=a.tokenizer_model,
                                            vocab_size=a.vocab_size)

    def parse(self, line: bytes):
        """{key: text} of one input line, or a string saying what is wrong with it."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"not valid UTF-8 (byte {e.start})"
        if self.args.plain_text:
            return {self.args.json_keys[0]: text.rstrip("\r\n")}
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            return f"not valid JSON ({e.msg} at column {e.colno})"
        if self.args.chat:
            try:
                return {"messages": conversation_of(doc)}
            except SFTDataError as e:
                return str(e)
        if not isinstance(doc, dict):
            return f"a JSON {type(doc).__name__}, not an object"
        values = {}
        for key in self.args.json_keys:
            if key not in doc:
                return f"no key {key!r}"
            if not isinstance(doc[key], str):
                return f"key {key!r} is {type(doc[key]).__name__}, not a string"
            values[key] = doc[key]
        return values

    def encode(self, task):
        """Tokenize one batch of lines: per key, the tokens and sequence lengths of each
        document; plus the invalid lines and the number of empty documents."""
        first_line, lines = task
        tok, a = Encoder.tokenizer, self.args
        out = {key: [] for key in a.json_keys}
        invalid, empty = [], 0
        for n, line in enumerate(lines):
            values = self.parse(line)
            if isinstance(values, str):
                invalid.append((first_line + n, values))
                continue
            if a.chat:
                try:
                    tokens, mask = tokenize_conversation(tok, values["messages"])
                except SFTDataError as e:
                    invalid.append((first_line + n, str(e)))
                    continue
                out["conversations"].append((tokens.astype(a.dtype), [len(tokens)]))
                out["loss_mask"].append((mask, [len(mask)]))
                continue
            docs = {}
            for key, text in values.items():
                pieces = split_sentences(text, a.keep_newlines) if a.split_sentences else [text]
                seqs = [ids for ids in tok.tokenize_batch(pieces) if len(ids)]
                if seqs and a.append_eod:
                    seqs[-1] = list(seqs[-1]) + [tok.eod]
                docs[key] = seqs
            if any(not seqs for seqs in docs.values()):
                empty += 1
                continue
            for key, seqs in docs.items():
                out[key].append((np.concatenate([np.asarray(s, dtype=a.dtype) for s in seqs]),
                                 [len(s) for s in seqs]))
        return out, invalid, empty, sum(len(line) for line in lines)


def open_input(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_tasks(path: str, start: int, end: int, first_line: int):
    """(first line number, lines) batches of the byte range [start, end) of ``path``."""
    with open_input(path) as f:
        if start:
            f.seek(start)
        position, line_no, batch = start, first_line, []
        for line in f:
            if end is not None and position >= end:
                break
            position += len(line)
            batch.append(line)
            if len(batch) == LINES_PER_TASK:
                yield line_no, batch
                line_no += len(batch)
                batch = []
        if batch:
            yield line_no, batch


class Progress:
    """A tqdm bar of MB read, with documents/s, or a plain line every --log-interval docs."""

    def __init__(self, total_bytes: int, log_interval: int, enabled: bool):
        self.docs, self.log_interval, self.next_log = 0, log_interval, log_interval
        self.start, self.bar = time.time(), None
        if not enabled:
            return
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                            desc="tokenizing", file=sys.stderr, mininterval=0.5)
        except ImportError:
            pass

    def update(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        elapsed = max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(nbytes)
            if self.docs >= self.next_log:
                self.bar.set_postfix(docs=self.docs, docs_per_s=f"{self.docs / elapsed:.0f}")
        elif self.docs >= self.next_log:
            print(f"processed {self.docs} documents ({self.docs / elapsed:.0f} docs/s)",
                  file=sys.stderr, flush=True)
        while self.docs >= self.next_log:
            self.next_log += self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            elapsed = max(time.time() - self.start, 1e-9)
            self.bar.set_postfix(docs=self.docs, docs_per_s=f"{self.docs / elapsed:.0f}")
            self.bar.close()


def level(args) -> str:
    return "sentence" if args.split_sentences else "document"


def dataset_names(args, prefix: str) -> dict:
    """{key: (output prefix, dtype)} of the datasets written under ``prefix``."""
    if args.chat:
        return {"conversations": (f"{prefix}_{CHAT_DATASET}", args.dtype),
                "loss_mask": (f"{prefix}_{CHAT_DATASET}{LOSS_MASK_SUFFIX}", np.uint8)}
    return {key: (f"{prefix}_{key}_{level(args)}", args.dtype) for key in args.json_keys}


def process_range(args, out_prefix: str, start: int, end, first_line: int, progress: bool):
    """Tokenize bytes [start, end) of the input into ``<out_prefix>_<key>_<level>`` datasets.
    Returns (stats, error message or None); on error the datasets are discarded."""
    encoder = Encoder(args)
    builders = {key: IndexedDatasetBuilder(name, dtype)
                for key, (name, dtype) in dataset_names(args, out_prefix).items()}
    stats = {"documents": 0, "tokens": 0, "empty": 0, "invalid": 0, "examples": []}
    total = (end if end is not None else os.path.getsize(args.input)) - start
    bar = Progress(total, args.log_interval, progress)
    error = None
    pool = multiprocessing.Pool(args.workers_per_partition, initializer=encoder.initializer)
    try:
        for out, invalid, empty, nbytes in pool.imap(
                encoder.encode, read_tasks(args.input, start, end, first_line)):
            if invalid and not args.skip_invalid:
                line, reason = invalid[0]
                error = f"{args.input}:{line}: {reason}"
                break
            stats["invalid"] += len(invalid)
            stats["examples"] += [f"{args.input}:{n}: {r}" for n, r in invalid][:3]
            stats["empty"] += empty
            for key, docs in out.items():
                for tokens, lengths in docs:
                    builders[key].add_document(tokens, lengths)
                    stats["tokens"] += len(tokens) if key != "loss_mask" else 0
            stats["documents"] += len(next(iter(out.values())))
            bar.update(len(next(iter(out.values()))), nbytes)
    finally:
        pool.terminate()
        bar.close()
    for builder in builders.values():
        builder.discard() if error else builder.finalize()
    return stats, error


def _partition_main(args, out_prefix, start, end, first_line, queue):
    queue.put(process_range(args, out_prefix, start, end, first_line, progress=False))


def partition_bounds(path: str, parts: int):
    """Byte offsets splitting ``path`` into ``parts`` runs of whole lines, and the line number
    each run starts at."""
    size = os.path.getsize(path)
    starts = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(size * k // parts, starts[-1]))
            f.readline()
            starts.append(min(f.tell(), size))
        lines, first_lines = 1, [1]
        f.seek(0)
        for a, b in zip(starts, starts[1:]):
            lines += f.read(b - a).count(b"\n")
            first_lines.append(lines)
    return starts, starts[1:] + [size], first_lines


def run_partitions(args):
    """Each partition in its own process (with its share of the workers), merged in order."""
    starts, ends, first_lines = partition_bounds(args.input, args.partitions)
    queue = multiprocessing.Queue()
    prefixes = [f"{args.output_prefix}_partition_{k}" for k in range(args.partitions)]
    procs = [multiprocessing.Process(target=_partition_main,
                                     args=(args, prefixes[k], starts[k], ends[k],
                                           first_lines[k], queue))
             for k in range(args.partitions)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    stats = {"documents": 0, "tokens": 0, "empty": 0, "invalid": 0, "examples": []}
    errors = sorted(e for _, e in results if e)
    for s, _ in results:
        for key in stats:
            stats[key] += s[key]
    parts = [dataset_names(args, prefix) for prefix in prefixes]
    for key, (name, dtype) in dataset_names(args, args.output_prefix).items():
        if not errors:
            merged = IndexedDatasetBuilder(name, dtype)
            for part in parts:
                merged.add_index(part[key][0])
            merged.finalize()
        for part in parts:
            for ext in (".bin", ".idx"):
                path = part[key][0] + ext
                if os.path.exists(path):
                    os.remove(path)
    return stats, (errors[0] if errors else None)


def main(argv=None) -> int:
    start_time = time.time()
    args = get_args(argv)
    args.plain_text = args.input.endswith(".txt") or args.input.endswith(".txt.gz")
    if args.plain_text:
        args.json_keys = args.json_keys[:1]
    if args.chat and args.plain_text:
        print("preprocess_data.py: error: --chat reads JSONL conversations, not plain text",
              file=sys.stderr)
        return 2
    if args.chat:
        args.json_keys = ["conversations", "loss_mask"]
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file,
                                    merge_file=args.merge_file,
                                    tokenizer_model=args.tokenizer_model,
                                    vocab_size=args.vocab_size)
    except ConfigError as e:
        print(f"preprocess_data.py: error: {str(e).replace('_', '-')}", file=sys.stderr)
        return 2
    args.dtype = optimal_dtype(tokenizer.vocab_size)
    if args.partitions > 1 and args.input.endswith(".gz"):
        print("note: a .gz input is read as one stream; --partitions applies to plain files",
              file=sys.stderr)
        args.partitions = 1
    args.workers_per_partition = max(1, args.workers // args.partitions)
    if args.partitions == 1:
        stats, error = process_range(args, args.output_prefix, 0, None, 1, progress=True)
    else:
        stats, error = run_partitions(args)
    if error:
        print(f"preprocess_data.py: error: {error} (nothing written; pass --skip-invalid to "
              "skip such lines)", file=sys.stderr)
        return 1
    elapsed = time.time() - start_time
    outputs = ", ".join(f"{name}.{{bin,idx}}"
                        for name, _ in dataset_names(args, args.output_prefix).values())
    kind = "conversations" if args.chat else "documents"
    print(f"done: {stats['documents']} {kind}, {stats['tokens']} tokens in {elapsed:.2f} s "
          f"-> {outputs}", file=sys.stderr)
    if stats["empty"]:
        print(f"skipped {stats['empty']} empty documents", file=sys.stderr)
    if stats["invalid"]:
        print(f"skipped {stats['invalid']} invalid lines, e.g. "
              + "; ".join(stats["examples"][:3]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
