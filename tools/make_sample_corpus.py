"""Write a sample JSONL corpus from the docstrings of the Python standard library.

    python tools/make_sample_corpus.py --output data/stdlib_docs.jsonl

One document per module: its module, class and function docstrings, in source order,
separated by blank lines. Read with ``ast`` (nothing is imported or downloaded), sorted by
path, so the same Python version always gives the same corpus.
"""

import argparse
import ast
import json
import os
import sys
import sysconfig

SKIPPED_DIRS = ("site-packages", "__pycache__", "test", "tests", "idle_test")


def module_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                docs.append(doc.strip())
    return "\n\n".join(docs)


def iter_modules(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--min-chars", type=int, default=200,
                   help="skip modules with less docstring text than this")
    args = p.parse_args(argv)
    root = sysconfig.get_paths()["stdlib"]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    count = size = 0
    with open(args.output + ".tmp", "w", encoding="utf-8") as out:
        for path in iter_modules(root):
            text = module_text(path)
            if len(text) < args.min_chars:
                continue
            line = json.dumps({"text": text, "source": os.path.relpath(path, root)},
                              ensure_ascii=False) + "\n"
            out.write(line)
            count += 1
            size += len(line.encode("utf-8"))
    os.replace(args.output + ".tmp", args.output)
    print(f"wrote {count} documents ({size / 1e6:.1f} MB) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
