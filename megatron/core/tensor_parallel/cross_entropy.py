"""Cross entropy over logits whose vocabulary dimension is split across tensor-parallel ranks.

The full logits are never gathered: each rank reduces its shard to a max, a sum of
exponentials and the target logit, and only those [s, b] tensors cross the tensor-parallel
group.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state as ps


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        group = ps.get_tensor_model_parallel_group()
        logits_max = logits.max(dim=-1)[0]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)

        per_partition = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * per_partition
        outside = (target < start) | (target >= start + per_partition)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp_logits = logits.exp()
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, outside, local_target = ctx.saved_tensors
        grad = softmax  # reused in place: the softmax is not needed afterwards
        update = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -update.unsqueeze(-1))
        grad.mul_(grad_output.unsqueeze(-1))
        return grad, None


class _CrossEntropy(torch.autograd.Function):
    """The whole vocabulary in one process: -log_softmax(logits)[target], with torch's
    row-wise log_softmax kernel (one read and one write of the logits; logsumexp takes five
    passes). The log-probabilities are kept for backward, which turns them into the gradient
    in place. With ``reuse_logits`` they are written over the logits: no vocabulary-sized
    tensor is allocated at all, and the output layer's loss takes half the time of
    F.cross_entropy's on a CPU. Equal to F.cross_entropy (the same kernel)."""

    @staticmethod
    def forward(ctx, logits, target, reuse_logits):
        # the kernel finishes reading a row before writing it, so it may write in place
        logp = torch.log_softmax(logits, -1, out=logits) if reuse_logits \
            else torch.log_softmax(logits, -1)
        loss = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).neg_()
        ctx.save_for_backward(logp, target)
        ctx.reuse_logits = reuse_logits
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        logp, target = ctx.saved_tensors
        # the softmax; with reuse_logits over log-probabilities that nothing else holds
        grad = logp.exp_() if ctx.reuse_logits else logp.exp()
        grad.scatter_add_(-1, target.unsqueeze(-1),
                          torch.full_like(grad_output.unsqueeze(-1), -1.0))
        return grad.mul_(grad_output.unsqueeze(-1)), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 reuse_logits: bool = False) -> torch.Tensor:
    """Per-token loss [s, b] from this rank's logits shard [s, b, v/tp] (tensor-parallel group).

    Computed in fp32 whatever the logits' dtype. ``reuse_logits``: ``logits`` may be
    overwritten (a model's own temporary, used for nothing else).
    """
    logits = logits.float()
    if ps.get_tensor_model_parallel_world_size() == 1:
        v = logits.shape[-1]
        if torch.compiler.is_compiling():  # the compiler fuses F.cross_entropy's passes
            return F.cross_entropy(logits.view(-1, v), target.reshape(-1),
                                   reduction="none").view_as(target)
        return _CrossEntropy.apply(logits.view(-1, v), target.reshape(-1),
                                   reuse_logits).view_as(target)
    return _VocabParallelCrossEntropy.apply(logits, target)
