"""Pretrain a GPT with the normalization placement of your choice (Megatron-LM's script shape).

    torchrun --nproc_per_node 1 pretrain_gpt.py --num-layers 4 --hidden-size 256 \
        --num-attention-heads 4 --seq-length 256 --norm-placement peri --mock-data \
        --tokenizer-type NullTokenizer --vocab-size 4096 --micro-batch-size 8 \
        --train-iters 100 --lr 1e-3 ...
"""

from functools import partial

import numpy as np
import torch

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTLowLevelDataset
from megatron.core.datasets.utils import Split, get_split_indices, parse_and_normalize_split
from megatron.core.models.gpt import GPTModel
from megatron.training import get_args, get_tokenizer, pretrain, print_rank_0
from megatron.training.arguments import transformer_config_from_args
from megatron.training.utils import average_losses_across_data_parallel_group


def model_provider(pre_process=True, post_process=True) -> GPTModel:
    """Build this pipeline stage's part of the GPT described by the flags."""
    args = get_args()
    print_rank_0(f"building GPT model (norm placement: {args.norm_placement}) ...")
    config = transformer_config_from_args(args)
    return GPTModel(config, args.padded_vocab_size, pre_process=pre_process,
                    post_process=post_process)


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """GPTDatasets over Megatron's mock documents, split by --split."""
    args, tokenizer = get_args(), get_tokenizer()
    low_level = MockGPTLowLevelDataset(tokenizer.vocab_size, tokenizer.eod)
    bounds = get_split_indices(parse_and_normalize_split(args.split), len(low_level))
    config = GPTDatasetConfig(
        sequence_length=args.seq_length, random_seed=args.seed, eod=tokenizer.eod,
        pad=tokenizer.pad, reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss)
    datasets = []
    for split, num_samples in zip(Split, train_val_test_num_samples):
        begin, end = bounds[split.value], bounds[split.value + 1]
        datasets.append(GPTDataset(low_level, np.arange(begin, end, dtype=np.int32), num_samples,
                                   split, config) if end > begin and num_samples else None)
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean per-token loss over the tokens the mask keeps."""
    losses = output_tensor.float().reshape(-1)
    loss_mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * loss_mask) / loss_mask.sum()
    return loss, {"lm loss": average_losses_across_data_parallel_group([loss])[0]}


def forward_step(data_iterator, model):
    """One micro-batch through the model; returns the per-token losses and the loss function."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


if __name__ == "__main__":
    pretrain(train_valid_test_datasets_provider, model_provider, None, forward_step)
