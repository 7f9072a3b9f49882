"""Autoregressive generation from a GPTModel, with a key/value cache, on one process or over
the tensor-parallel group.

Prompts of different lengths are batched the Megatron way: right-padded to the longest, the
shortest prompt's length is the first (prefill) step for every row, then one position at a
time; a row whose prompt is longer takes its own prompt's next token until the prompt ends.
Every row sees only its own tokens under causal attention, so its result is that of
generating its prompt alone (with greedy decoding; sampled rows draw from one generator
shared by the batch).
"""

from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.core import ConfigError
from megatron.core import parallel_state as ps
from megatron.core.inference.kv_cache import InferenceContext
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region


def sample(logits: torch.Tensor, vocab_size: int, *, greedy: bool = False,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [b] from logits [b, padded vocabulary] (local; no process group).

    Only ids below ``vocab_size`` are candidates: the padded vocabulary's dummy rows are cut
    off. ``greedy`` (or ``top_k`` = 1): argmax. Otherwise the logits are divided by
    ``temperature``, restricted to the ``top_k`` largest (0: all) and then to the nucleus of
    ``top_p`` (0: off; Megatron's rule: the smallest set of most likely tokens whose
    probability sums to more than ``top_p``, the most likely token always kept), and one
    token is drawn with ``generator``.
    """
    logits = logits[:, :vocab_size].float()
    if greedy or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 1:
        kth = torch.topk(logits, min(top_k, vocab_size), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        beyond = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
        # keep the token that crosses top_p too: shift the filter right by one
        beyond = torch.cat([torch.zeros_like(beyond[:, :1]), beyond[:, :-1]], dim=-1)
        logits = logits.masked_fill(beyond.scatter(1, order, beyond), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, prompts: List[List[int]], max_new_tokens: int, *, eod: Optional[int],
             vocab_size: int, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 0.0, seed: Optional[int] = None, use_kv_cache: bool = True,
             stop_on_eod: bool = True) -> List[List[int]]:
    """The new tokens of each prompt: up to ``max_new_tokens`` of them, ending with ``eod``
    when the row stopped there (``stop_on_eod``).

    ``model``: a GPTModel holding the whole stack (no pipeline parallelism); it runs in eval
    mode and is put back in its mode afterwards. ``vocab_size``: the tokenizer's true
    vocabulary, below the model's padded one. Sampling: see :func:`sample`; ``seed`` seeds
    the generator (None: torch's default one). ``use_kv_cache=False`` recomputes the whole
    sequence at every step (the same tokens, slower).

    Process group: the tensor-parallel group. Every rank of it calls this with the same
    arguments; the vocabulary-parallel logits are all-gathered over it, and the first rank
    of the group chooses each token and broadcasts it, so all ranks return the same lists.
    """
    module = getattr(model, "module", model)
    _check_layout(module)
    _check_arguments(module, prompts, max_new_tokens, vocab_size, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(module.parameters()).device
    lengths = [len(p) for p in prompts]
    total = max(lengths) + max_new_tokens
    tokens = torch.full((len(prompts), total), eod if eod is not None else 0, dtype=torch.long,
                        device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    context = InferenceContext(len(prompts), total) if use_kv_cache else None
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    sampling = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    results: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    was_training = module.training
    module.eval()
    try:
        start = 0
        for end in range(min(lengths), total):  # the logits at end - 1 choose token `end`
            logits = _last_logits(model, tokens, start if use_kv_cache else 0, end, context)
            chosen = _choose(logits, vocab_size, generator, sampling)
            take = [end >= length and not finished for length, finished in zip(lengths, done)]
            tokens[:, end] = torch.where(torch.tensor(take, device=device), chosen,
                                         tokens[:, end])
            for row, token in enumerate(chosen.tolist()):
                if take[row]:
                    results[row].append(token)
                    done[row] = (stop_on_eod and token == eod) or \
                        len(results[row]) == max_new_tokens
            if all(done):
                break
            start = end
    finally:
        module.train(was_training)
    return results


def _last_logits(model, tokens: torch.Tensor, start: int, end: int,
                 context: Optional[InferenceContext]) -> torch.Tensor:
    """Whole-vocabulary logits [b, padded vocab] of position end - 1, from a forward over
    positions start .. end - 1 (after the context's cached ones). Process group: the
    tensor-parallel group (all-gather of the vocabulary shards)."""
    ids = tokens[:, start:end]
    positions = torch.arange(start, end, device=ids.device).unsqueeze(0).expand_as(ids)
    logits = model(ids, positions, inference_context=context)
    if context is not None:
        context.increment_sequence_len_offset(end - start)
    return gather_from_tensor_model_parallel_region(logits[:, -1, :].contiguous())


def _choose(logits: torch.Tensor, vocab_size: int, generator, sampling: dict) -> torch.Tensor:
    """Token ids [b] sampled on the first rank of the tensor-parallel group and broadcast
    over that group, so every rank continues with the same tokens."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return sample(logits, vocab_size, generator=generator, **sampling)
    group = ps.get_tensor_model_parallel_group()
    src = dist.get_process_group_ranks(group)[0]
    if dist.get_rank() == src:
        chosen = sample(logits, vocab_size, generator=generator, **sampling)
    else:
        chosen = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    dist.broadcast(chosen, src, group=group)
    return chosen


def _check_layout(module) -> None:
    if ps.get_pipeline_model_parallel_world_size() > 1 or not module.pre_process or \
            not module.post_process:
        raise ConfigError(
            f"pipeline_model_parallel_size={ps.get_pipeline_model_parallel_world_size()} is not "
            "supported by text generation; load the checkpoint with "
            "pipeline_model_parallel_size=1 (any saved layout loads that way).")
    config = module.config
    if config.sequence_parallel and config.tensor_model_parallel_size > 1:
        raise ConfigError("sequence_parallel=True is not supported by text generation; build "
                          "the model with sequence_parallel=False.")


def _check_arguments(module, prompts, max_new_tokens, vocab_size, temperature, top_k,
                     top_p) -> None:
    """A sentence naming the value for each argument that cannot work (ValueError)."""
    if not 1 <= vocab_size <= module.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {module.vocab_size}], the "
                         "model's padded vocabulary.")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt.")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} has no tokens; every prompt needs at least one.")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary of "
                             f"{vocab_size} tokens.")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 0.")
    if temperature <= 0.0:
        raise ValueError(f"temperature={temperature} must be positive.")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be at least 0 (0: no top-k filtering).")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must lie in [0, 1] (0: no nucleus filtering).")
    longest, config = max(len(p) for p in prompts), module.config
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens="
                         f"{max_new_tokens} exceeds the {config.max_position_embeddings} "
                         "positions the model was built for; shorten the prompt or generate "
                         "fewer tokens.")
