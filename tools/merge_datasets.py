"""Concatenate Megatron .bin/.idx datasets into one.

    python tools/merge_datasets.py --input data/parts --output-prefix data/all_text_document

Every <prefix>.bin/.idx pair in --input (sorted by name), or the prefixes given with
--prefixes, are appended in order. The output appears only when complete.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.utils import DataError


def find_prefixes(directory: str):
    names = sorted(f[:-4] for f in os.listdir(directory) if f.endswith(".idx"))
    return [os.path.join(directory, n) for n in names
            if os.path.isfile(os.path.join(directory, n + ".bin"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="directory holding the datasets to merge")
    source.add_argument("--prefixes", nargs="+", help="dataset prefixes to merge, in order")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    if args.input and not os.path.isdir(args.input):
        p.error(f"--input {args.input} is not a directory")
    prefixes = find_prefixes(args.input) if args.input else args.prefixes
    if not prefixes:
        p.error(f"--input {args.input} holds no .bin/.idx pairs")
    try:
        first = IndexedDataset(prefixes[0])
        builder = IndexedDatasetBuilder(args.output_prefix, first.dtype)
        try:
            for prefix in prefixes:
                builder.add_index(prefix)
        except BaseException:
            builder.discard()
            raise
        builder.finalize()
    except DataError as e:
        print(f"merge_datasets.py: error: {e}", file=sys.stderr)
        return 1
    merged = IndexedDataset(args.output_prefix)
    print(f"merged {len(prefixes)} datasets: {len(merged.document_indices) - 1} documents, "
          f"{int(merged.sequence_lengths.sum())} tokens -> {args.output_prefix}.{{bin,idx}}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
