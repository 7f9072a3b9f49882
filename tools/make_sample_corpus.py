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


def write_corpus(output: str, min_chars: int = 200, max_documents: int = None,
                 kind: str = "docstrings", max_bytes: int = None):
    """Write the corpus; return (documents, bytes). ``kind`` "source" takes whole module
    sources instead of docstrings (a bigger, code-heavy corpus)."""
    root = sysconfig.get_paths()["stdlib"]
    if os.path.dirname(os.path.abspath(output)):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    count = size = 0
    with open(output + ".tmp", "w", encoding="utf-8") as out:
        for path in iter_modules(root):
            if kind == "source":
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            else:
                text = module_text(path)
            if len(text) < min_chars:
                continue
            line = json.dumps({"text": text, "source": os.path.relpath(path, root)},
                              ensure_ascii=False) + "\n"
            if max_bytes is not None and size + len(line.encode("utf-8")) > max_bytes:
                break
            out.write(line)
            count += 1
            size += len(line.encode("utf-8"))
            if max_documents is not None and count >= max_documents:
                break
    os.replace(output + ".tmp", output)
    return count, size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--min-chars", type=int, default=200,
                   help="skip modules with less text than this")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--kind", choices=["docstrings", "source"], default="docstrings")
    args = p.parse_args(argv)
    count, size = write_corpus(args.output, args.min_chars, args.max_documents, args.kind,
                               args.max_bytes)
    print(f"wrote {count} documents ({size / 1e6:.1f} MB) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
