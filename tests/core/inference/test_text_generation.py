"""Generation with a key/value cache: the cache reproduces full recomputation for every
placement and position type, batched prompts equal single ones, sampling obeys its filters,
and tensor parallelism gives one process's logits and tokens."""

import math

import pytest
import torch
import torch.distributed as dist

from megatron.core import ConfigError
from megatron.core import parallel_state as ps
from megatron.core.inference import InferenceContext, generate, sample
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.tensor_parallel.utils import merge_shards
from megatron.core.transformer import TransformerConfig
from tests.helpers import run_distributed

PADDED, VOCAB = 256, 200  # ids 200..255 are the padded vocabulary's dummy rows
PROMPTS = [[5, 17, 3], [9, 1, 44, 120, 7, 64, 2], [88]]
# fp32; the cache changes only the shapes of the matmuls (hence their summation order), so
# logits agree to a few ulps of values of order 1.
RTOL, ATOL = 1e-5, 1e-5


def make_model(placement="peri", position="rope", tp=1, **kw):
    """Three layers (mix: one Post-LN, two Pre-LN), GQA with 2 groups of 2 heads; a wide
    init so that logits are spread and greedy choices are far from ties, and by default an
    untied output layer so that greedy decoding does not just repeat the last token."""
    set_random_seed(0)
    kw.setdefault("share_embeddings_and_output_weights", False)
    config = TransformerConfig(num_layers=3, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, norm_placement=placement,
                               position_embedding_type=position, hidden_dropout=0.0,
                               attention_dropout=0.0, max_position_embeddings=40,
                               init_method_std=0.2, tensor_model_parallel_size=tp, **kw)
    return GPTModel(config, PADDED).eval()


def cached_logits(model, ids, chunks):
    """Logits of ``ids`` fed through one inference context in the given chunks."""
    context, out = InferenceContext(ids.shape[0], ids.shape[1]), []
    with torch.no_grad():
        for start, end in chunks:
            pos = torch.arange(start, end).expand(ids.shape[0], -1)
            out.append(model(ids[:, start:end], pos, inference_context=context))
            context.increment_sequence_len_offset(end - start)
    return torch.cat(out, dim=1)


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1))


CASES = [(p, pos) for p in ("pre", "post", "peri", "mix") for pos in ("rope", "learned_absolute")]


@pytest.mark.parametrize("placement,position", CASES)
def test_cached_forward_equals_full_forward(placement, position):
    """A prefill, single tokens and a multi-token chunk after cached ones (the offset causal
    mask) give the logits of one forward over the whole sequence."""
    model = make_model(placement, position)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    got = cached_logits(model, ids, [(0, 5), (5, 6), (6, 9), (9, 10), (10, 12)])
    torch.testing.assert_close(got, full_logits(model, ids), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("placement,position", CASES)
def test_cached_generation_equals_recomputation(placement, position):
    model = make_model(placement, position)
    for sampling in (dict(greedy=True), dict(top_k=20, temperature=0.8, seed=3)):
        cached = generate(model, PROMPTS, 8, eod=None, vocab_size=VOCAB, **sampling)
        again = generate(model, PROMPTS, 8, eod=None, vocab_size=VOCAB, use_kv_cache=False,
                         **sampling)
        assert cached == again, sampling
        assert [len(r) for r in cached] == [8, 8, 8]


@pytest.mark.parametrize("placement,position", [("peri", "rope"), ("mix", "learned_absolute")])
def test_batch_of_prompts_equals_each_alone(placement, position):
    model = make_model(placement, position)
    batch = generate(model, PROMPTS, 6, eod=None, vocab_size=VOCAB, greedy=True)
    alone = [generate(model, [p], 6, eod=None, vocab_size=VOCAB, greedy=True)[0]
             for p in PROMPTS]
    assert batch == alone


def test_greedy_equals_top_k_1_and_tiny_top_p():
    model = make_model()
    greedy = generate(model, PROMPTS, 8, eod=None, vocab_size=VOCAB, greedy=True)
    top_k = generate(model, PROMPTS, 8, eod=None, vocab_size=VOCAB, top_k=1, seed=5)
    top_p = generate(model, PROMPTS, 8, eod=None, vocab_size=VOCAB, top_p=1e-6,
                     temperature=0.7, seed=5)
    assert greedy == top_k == top_p


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    model = make_model("pre", "learned_absolute")
    runs = [generate(model, PROMPTS, 10, eod=None, vocab_size=VOCAB, top_k=3, seed=seed)
            for seed in (11, 11, 12)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for prompt, new in zip(PROMPTS, runs[0]):
        logits = full_logits(model, torch.tensor([prompt + new]))[0, :, :VOCAB]
        for i, token in enumerate(new):
            top3 = logits[len(prompt) + i - 1].topk(3).indices.tolist()
            assert token in top3, (prompt, i, token, top3)


@pytest.mark.parametrize("top_p,kept", [(0.1, {0}), (0.5, {0, 1}), (0.6, {0, 1}),
                                        (0.85, {0, 1, 2}), (0.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_whose_probability_exceeds_p(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1)
    drawn = sample(logits, 4, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == kept  # 4000 draws: every kept token appears


def test_stops_at_eod():
    model = make_model("post", "rope")
    free = generate(model, PROMPTS[:1], 10, eod=None, vocab_size=VOCAB, greedy=True)[0]
    eod = free[3]
    stop = free.index(eod)
    alone = generate(model, PROMPTS[:1], 10, eod=eod, vocab_size=VOCAB, greedy=True)[0]
    assert alone == free[:stop + 1] and alone[-1] == eod
    batch = generate(model, PROMPTS, 10, eod=eod, vocab_size=VOCAB, greedy=True)
    assert batch[0] == alone
    assert batch == [generate(model, [p], 10, eod=eod, vocab_size=VOCAB, greedy=True)[0]
                     for p in PROMPTS]
    assert generate(model, PROMPTS[:1], 10, eod=eod, vocab_size=VOCAB, greedy=True,
                    stop_on_eod=False)[0] == free


class _PaddingRowsWin(GPTModel):
    """Logits of the padded vocabulary's dummy rows far above every real one."""

    def forward(self, *args, **kw):
        logits = super().forward(*args, **kw)
        return torch.cat([logits[..., :VOCAB], logits[..., VOCAB:] + 100.0], dim=-1)


def test_padded_vocabulary_is_never_produced():
    set_random_seed(0)
    model = _PaddingRowsWin(make_model().config, PADDED)
    for sampling in (dict(greedy=True), dict(seed=0), dict(seed=0, top_k=50, top_p=0.9)):
        out = generate(model, PROMPTS, 8, eod=None, vocab_size=VOCAB, **sampling)
        assert all(0 <= t < VOCAB for row in out for t in row), sampling


@pytest.mark.parametrize("kw,match", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1], []]), "prompt 1 has no tokens"),
    (dict(prompts=[[1, 250]]), "token id 250"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(vocab_size=300), "vocab_size=300"),
    (dict(max_new_tokens=38), "exceeds the 40 positions"),
])
def test_bad_arguments_are_named(kw, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4, vocab_size=VOCAB)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(make_model(), args.pop("prompts"), args.pop("max_new_tokens"), eod=None,
                 **args)


def test_pipeline_stage_and_sequence_parallel_are_refused():
    set_random_seed(0)
    stage = GPTModel(make_model().config, PADDED, post_process=False, layer_numbers=[1, 2])
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size"):
        generate(stage, PROMPTS, 4, eod=None, vocab_size=VOCAB)
    sp = make_model(tp=2, sequence_parallel=True)  # built on one process: refused before use
    with pytest.raises(ConfigError, match="sequence_parallel"):
        generate(sp, PROMPTS, 4, eod=None, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="sequence_parallel"):
        sp(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), inference_context=InferenceContext(1, 4))


def test_context_overflow_is_named():
    with pytest.raises(ValueError, match="does not fit"):
        cached_logits(make_model(), torch.tensor([[1, 2, 3]]), [(0, 3)] * 2)


# --- tensor parallelism: one group of 2 processes for the whole module ----------------------
TP_CASES = {"peri-rope-swiglu": dict(placement="peri", position="rope", gated_linear_unit=True,
                                     add_bias_linear=False, normalization="RMSNorm"),
            "mix-learned-tied": dict(placement="mix", position="learned_absolute",
                                     share_embeddings_and_output_weights=True)}
SAMPLING = {"greedy": dict(greedy=True), "top-p": dict(top_p=0.9, temperature=0.9, seed=7)}


def _generate_on_ranks():
    """{case: (one-process logits, TP=2 logits gathered, {sampling: (one-process tokens,
    TP=2 tokens)})} on each rank."""
    dist.init_process_group("gloo")
    out = {}
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    for name, kw in TP_CASES.items():
        ps.destroy_model_parallel()
        ref = make_model(**kw)
        ref_logits = cached_logits(ref, ids, [(0, 6), (6, 7), (7, 9)])
        ref_tokens = {s: generate(ref, PROMPTS, 8, eod=None, vocab_size=VOCAB, **v)
                      for s, v in SAMPLING.items()}
        ps.initialize_model_parallel(2)
        model = make_model(tp=2, **kw)
        shard = cached_logits(model, ids, [(0, 6), (6, 7), (7, 9)])
        parts = [torch.empty_like(shard) for _ in range(2)]
        dist.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
        tokens = {s: generate(model, PROMPTS, 8, eod=None, vocab_size=VOCAB, **v)
                  for s, v in SAMPLING.items()}
        ps.destroy_model_parallel()
        out[name] = (ref_logits, merge_shards(parts, -1),
                     {s: (ref_tokens[s], tokens[s]) for s in SAMPLING})
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def tensor_parallel_results():
    return run_distributed(_generate_on_ranks, 2)


@pytest.mark.parametrize("case", list(TP_CASES))
def test_tensor_parallel_logits_equal_one_process(tensor_parallel_results, case):
    for rank_results in tensor_parallel_results:
        ref, got, _ = rank_results[case]
        # sums split over two ranks round differently: a few ulps (as in the model tests)
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
        assert not math.isnan(got.sum().item())


@pytest.mark.parametrize("case", list(TP_CASES))
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_tensor_parallel_tokens_equal_one_process(tensor_parallel_results, case, sampling):
    for rank_results in tensor_parallel_results:
        ref, got = rank_results[case][2][sampling]
        assert got == ref
