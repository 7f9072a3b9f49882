"""evaluation/scoring.py: packed, shared-context scoring gives each request the
log-likelihood a plain forward pass over context + continuation gives it."""

import numpy as np
import pytest
import torch
from evaluation.scoring import batch_tensors, pack_rows, score_requests

from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.transformer import TransformerConfig

VOCAB = 50


def _model(placement, positions):
    set_random_seed(3)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                               ffn_hidden_size=64, norm_placement=placement,
                               position_embedding_type=positions,
                               rope_from_position_ids=True, max_position_embeddings=64,
                               hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(config, vocab_size=VOCAB).eval()


def _plain(model, context, continuation, seq_length):
    """Sum of log p(continuation | context), one causal pass (lm-eval's truncation)."""
    whole = (list(context) + list(continuation))[-(seq_length + 1):]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None])
    logp = torch.log_softmax(logits[0].double(), -1)
    k = len(continuation)
    targets = torch.tensor(whole[1:])[-k:]
    return float(logp[-k:].gather(-1, targets[:, None]).sum())


def _requests(rng):
    out = []
    for _ in range(7):  # questions: one context, several choices
        context = rng.integers(0, VOCAB, rng.integers(1, 12)).tolist()
        for _ in range(rng.integers(2, 5)):
            out.append((context, rng.integers(0, VOCAB, rng.integers(1, 6)).tolist()))
    for _ in range(3):  # winogrande-like: several contexts, one continuation
        out.append((rng.integers(0, VOCAB, 5).tolist(), [7, 8, 9]))
    out.append((rng.integers(0, VOCAB, 40).tolist(), rng.integers(0, VOCAB, 3).tolist()))
    return out


@pytest.mark.parametrize("placement, positions", [("peri", "rope"),
                                                  ("pre", "learned_absolute")])
def test_matches_one_pass_per_request(placement, positions):
    model = _model(placement, positions)
    requests = _requests(np.random.default_rng(0))
    seq_length = 32  # the 40-token context is truncated, as lm-evaluation-harness does

    def token_losses(rows):
        tokens, labels, pos, mask = batch_tensors(rows, len(rows), seq_length)
        with torch.no_grad():
            return model(tokens, pos, mask, labels=labels)

    got = score_requests(requests, seq_length, 3, token_losses)
    expected = [_plain(model, c, x, seq_length) for c, x in requests]
    # fp32 forward passes over different row layouts: equal to summation order
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_choices_share_their_context():
    context = list(range(1, 11))
    requests = [(context, [20 + k, 30]) for k in range(4)]
    rows = pack_rows(requests, 64)
    assert len(rows) == 1
    # 9 shared positions + 4 branches of 2 (the copied last context token and one choice
    # token): 17 instead of 4 x 11 = 44
    used = max(end for _, _, end in rows[0].spans)
    assert used == 9 + 4 * 2
    allowed = ~rows[0].mask[0]
    first, second = rows[0].spans[0], rows[0].spans[1]
    assert allowed[second[1], :9].all() and not allowed[second[1], first[1]:first[2]].any()
