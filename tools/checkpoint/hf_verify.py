"""Check a conversion on real tokens: our model and the Hugging Face one give the same
logits, and the same greedy continuation (ours from the generation code that
tools/run_text_generation.py uses, theirs from transformers' ``generate``)."""

from typing import Callable, List, Optional

import torch

from megatron.training.checkpoint_layout import (
    config_from_args,
    load_model_weights,
    one_process_args,
)

SAMPLE_TEXT = ("The history of the printing press begins in the fifteenth century, when "
               "movable type made books cheap enough for ordinary readers. Within fifty years "
               "presses were at work in more than two hundred cities across Europe.")


def our_model(args: dict, tensor: Callable[[str], torch.Tensor]):
    """The one-process model ``args`` describe in fp32, dropout off, weights from
    ``tensor(name)``."""
    from megatron.core.models.gpt import GPTModel
    config = config_from_args(one_process_args(args), hidden_dropout=0.0,
                              attention_dropout=0.0, params_dtype=torch.float32)
    model = GPTModel(config, args["padded_vocab_size"])
    load_model_weights([model], lambda name: tensor(name).float())
    return model.eval()


def sample_tokens(tokenizer, vocab_size: int, length: int) -> List[int]:
    """Tokens of a sample sentence (or fixed pseudo-random ids without a text tokenizer)."""
    ids = []
    if tokenizer is not None and type(tokenizer).__name__ != "NullTokenizer":
        ids = [i for i in tokenizer.tokenize(SAMPLE_TEXT) if 0 <= i < vocab_size]
    if len(ids) < 8:
        ids = torch.randint(0, vocab_size, (length,),
                            generator=torch.Generator().manual_seed(0)).tolist()
    return ids[:length]


@torch.no_grad()
def _ours_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions)


@torch.no_grad()
def _greedy_hf(model, prompt: List[int], steps: int) -> List[int]:
    """Greedy continuation by the Hugging Face model's own forward, every step (no stop at an
    end-of-document token, which generate() would take from the generation config)."""
    tokens = torch.tensor([prompt])
    for _ in range(steps):
        logits = model(tokens, attention_mask=torch.ones_like(tokens)).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, len(prompt):].tolist()


def compare(args: dict, tensor: Callable[[str], torch.Tensor], hf_dir: str, remote: bool,
            vocab: int, tokenizer=None, steps: int = 32, length: Optional[int] = None) -> dict:
    """Run our model and the exported one on the same tokens; {"max_abs_diff",
    "max_abs_logit", "tokens", "greedy_agree", "ours", "hf"}."""
    import transformers

    from megatron.core.inference.text_generation import generate
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ours = our_model(args, tensor)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, trust_remote_code=remote, local_files_only=True).eval()
    limit = args.get("max_position_embeddings") or 2048
    length = length or max(8, min(48, limit - steps))
    prompt = sample_tokens(tokenizer, vocab, length)
    tokens = torch.tensor([prompt])
    a = _ours_logits(ours, tokens)[..., :vocab]
    with torch.no_grad():
        b = theirs(input_ids=tokens).logits[..., :vocab].float()
    steps = min(steps, limit - len(prompt))
    mine = generate(ours, [prompt], steps, eod=None, vocab_size=vocab, greedy=True)[0]
    hf = _greedy_hf(theirs, prompt, steps)
    return {"max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
            "tokens": len(prompt), "greedy_agree": mine == hf, "ours": mine, "hf": hf,
            "steps": steps}
