"""Pretrain a GPT with the normalization placement of your choice (Megatron-LM's script shape).

    torchrun --nproc_per_node 1 pretrain_gpt.py --num-layers 4 --hidden-size 256 \
        --num-attention-heads 4 --seq-length 256 --norm-placement peri --mock-data \
        --tokenizer-type NullTokenizer --vocab-size 4096 --micro-batch-size 8 \
        --train-iters 100 --lr 1e-3 ...
"""

from functools import partial

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.datasets.builder import build_gpt_datasets
from megatron.core.datasets.conversations import SFTDataError
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTLowLevelDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.sft_dataset import build_sft_datasets
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import context_parallel
from megatron.training import get_args, get_timers, get_tokenizer, pretrain, print_rank_0
from megatron.training.arguments import exit_with_error, transformer_config_from_args
from megatron.training.initialize import destroy_distributed
from megatron.training.utils import average_losses_across_data_parallel_group


def model_provider(pre_process=True, post_process=True) -> GPTModel:
    """Build this pipeline stage's part of the GPT described by the flags."""
    args = get_args()
    print_rank_0(f"building GPT model (norm placement: {args.norm_placement}) ...")
    config = transformer_config_from_args(args)
    return GPTModel(config, args.padded_vocab_size, pre_process=pre_process,
                    post_process=post_process)


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """GPTDatasets (or blends of them) over --data-path / --*-data-path, or over Megatron's
    mock documents with --mock-data; split by --split."""
    args, tokenizer = get_args(), get_tokenizer()
    if args.sft:
        return sft_datasets(args, tokenizer, train_val_test_num_samples)
    config = GPTDatasetConfig(
        sequence_length=args.seq_length, random_seed=args.seed, eod=tokenizer.eod,
        pad=tokenizer.pad, reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask and
        args.create_attention_mask_in_dataloader,  # Megatron: no mask, no document masking
        document_ids=args.context_parallel_size > 1,  # a mask context parallelism can split
        eod_mask_loss=args.eod_mask_loss, path_to_cache=args.data_cache_path)
    if args.mock_data:
        mock = MockGPTLowLevelDataset(tokenizer.vocab_size, tokenizer.eod)
        datasets = build_gpt_datasets(config, train_val_test_num_samples, args.split_vector,
                                      blend=([None], None), open_dataset=lambda _: mock)
    else:
        datasets = build_gpt_datasets(config, train_val_test_num_samples, args.split_vector,
                                      blend=args.blend, blend_per_split=args.blend_per_split,
                                      open_dataset=partial(IndexedDataset,
                                                           mmap=args.mmap_bin_files))
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


def sft_datasets(args, tokenizer, train_val_test_num_samples):
    """Packed conversations (--sft) from JSONL: --data-path split by --split, or a file per
    split with --train-data-path/--valid-data-path/--test-data-path."""
    per_split = None if args.blend_per_split is None else \
        [b[0] if b else None for b in args.blend_per_split]
    try:
        datasets, stats = build_sft_datasets(
            tokenizer, args.seq_length, train_val_test_num_samples, args.seed,
            files=args.blend[0] if args.blend else None, split=args.split_vector,
            files_per_split=per_split, overlong=args.sft_overlong,
            document_ids=args.context_parallel_size > 1)
    except SFTDataError as e:
        exit_with_error(f"--sft: {e}")
    for name, st in zip(("train", "validation", "test"), stats):
        if st is not None:
            print_rank_0(st.line(name, args.seq_length))
    return datasets


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean per-token loss over the tokens the mask keeps. With --calculate-per-token-loss,
    Megatron-LM's (loss sum, tokens, {"lm loss": [sum, tokens]}): the schedule and train_step
    divide by the global batch's tokens (all micro-batches, all data and context parallel
    ranks).

    With context parallelism this rank holds 1/cp of each sequence: the mean is over the whole
    sequences' tokens (counted over the context-parallel group), and as gradients are averaged
    over context-parallel ranks too, each rank's loss is cp x its share of that mean."""
    losses = output_tensor.float().reshape(-1)
    loss_mask = loss_mask.reshape(-1).float()
    if get_args().calculate_per_token_loss:
        loss = torch.sum(losses * loss_mask)
        num_tokens = loss_mask.sum().detach().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1),
                                                        num_tokens.view(1)])}
    loss_sum, tokens = torch.sum(losses * loss_mask), loss_mask.sum()
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        loss = loss_sum / tokens
        return loss, {"lm loss": average_losses_across_data_parallel_group([loss])[0]}
    totals = torch.stack([loss_sum.detach(), tokens])
    dist.all_reduce(totals, group=ps.get_context_parallel_group())
    loss = loss_sum * cp / totals[1]
    return loss, {"lm loss": average_losses_across_data_parallel_group(
        [totals[0] / totals[1]])[0]}


def forward_step(data_iterator, model):
    """One micro-batch (this context-parallel rank's part of it) through the model; returns
    the per-token losses and the loss function."""
    get_timers()("batch-generator", log_level=2).start()
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = context_parallel.split_batch({k: v.to(device, non_blocking=True)
                                          for k, v in batch.items()})
    get_timers()("batch-generator").stop()
    mask = batch.get("attention_mask", batch.get("document_ids"))
    output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


if __name__ == "__main__":
    pretrain(train_valid_test_datasets_provider, model_provider, None, forward_step)
    destroy_distributed()
