"""Runs inside a virtual environment with pip's megatron-core 0.16.1 (never imports ours).

    python mcore_side.py <command> <json arguments> <output .npz>

write:   build .bin/.idx with megatron-core's IndexedDatasetBuilder from the given documents
read:    read a dataset with megatron-core's IndexedDataset, dump lengths/doc indices/tokens
samples: build GPT datasets with BlendedMegatronDatasetBuilder, dump the first samples
"""

import json
import sys

import numpy as np


class _Tokenizer:
    def __init__(self, eod, pad, vocab_size):
        self.eod, self.pad, self.vocab_size = eod, pad, vocab_size
        self.unique_identifiers = {"class": "TestTokenizer", "eod": eod}


def write(a, out):
    import torch

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(a["prefix"] + ".bin", dtype=getattr(np, a["dtype"]))
    for doc in a["documents"]:
        for sentence in doc:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
    builder.finalize(a["prefix"] + ".idx")
    np.savez(out, ok=np.array(1))


def read(a, out):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(a["prefix"])
    tokens = np.concatenate([ds[i] for i in range(len(ds))]) if len(ds) else np.zeros(0)
    np.savez(out, lengths=ds.sequence_lengths, document_indices=ds.document_indices,
             tokens=tokens, dtype=np.array(str(ds.index.dtype.__name__)))


def samples(a, out):
    import torch.distributed as dist
    if not dist.is_initialized():  # megatron-core's BlendedDataset asks for the rank
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a['port']}",
                                rank=0, world_size=1)
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    config = GPTDatasetConfig(
        random_seed=a["seed"], sequence_length=a["seq_length"],
        blend=a.get("blend"), blend_per_split=a.get("blend_per_split"), split=a.get("split"),
        path_to_cache=a["cache"], tokenizer=_Tokenizer(a["eod"], a["pad"], a["vocab_size"]),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False)
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, a["sizes"], lambda: True,
                                             config).build()
    result = {}
    for name, ds in zip(("train", "valid", "test"), datasets):
        if ds is None:
            continue
        n = min(len(ds), a["count"])
        result[f"{name}_len"] = np.array(len(ds))
        result[f"{name}_tokens"] = np.stack([ds[i]["tokens"].numpy() for i in range(n)])
        result[f"{name}_labels"] = np.stack([ds[i]["labels"].numpy() for i in range(n)])
    np.savez(out, **result)


if __name__ == "__main__":
    command, arguments, output = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    {"write": write, "read": read, "samples": samples}[command](arguments, output)
