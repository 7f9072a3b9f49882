"""Fine-tuning data: reading and checking conversations, the chat templates' loss masks,
packing, and the parity that matters: a conversation packed with others gets exactly the
per-token losses it gets alone."""

import json

import numpy as np
import pytest
import torch

from megatron.core.datasets.conversations import (
    SFTDataError,
    generation_prompt,
    read_conversations,
    tokenize_conversation,
)
from megatron.core.datasets.sft_dataset import SFTDataset, pack
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import set_random_seed
from megatron.core.tokenizers import build_tokenizer
from megatron.core.transformer import TransformerConfig

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What does len return?"},
        {"role": "assistant", "content": "The number of items."},
        {"role": "user", "content": "And sorted?"},
        {"role": "assistant", "content": "A new sorted list."}]


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


@pytest.fixture(scope="module")
def sp_tokenizer(sp_model):
    return build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)


def test_reads_both_layouts(tmp_path):
    path = _write(tmp_path, [{"messages": CHAT}, "",
                             {"prompt": "Say hi.", "response": "Hi.", "system": "Be kind."}])
    conversations = read_conversations(path)
    assert conversations[0] == CHAT
    assert conversations[1] == [{"role": "system", "content": "Be kind."},
                                {"role": "user", "content": "Say hi."},
                                {"role": "assistant", "content": "Hi."}]


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "has no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "message 0 has the unknown role 'bot'"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "content is int, not a string"),
    ('{"messages": [{"role": "assistant"}]}', "message 0 is not a"),
    ('{"question": "hi"}', "expected \"messages\", or \"prompt\" and \"response\""),
    ('{"messages": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, problem):
    path = _write(tmp_path, [{"prompt": "a", "response": "b"}, line])
    with pytest.raises(SFTDataError) as e:
        read_conversations(path)
    assert str(e.value).startswith(f"{path}:2: ") and problem in str(e.value), str(e.value)


def test_default_template_masks_the_assistant(sp_tokenizer):
    tokens, mask = tokenize_conversation(sp_tokenizer, CHAT)
    assert tokens.dtype == np.int32 and len(tokens) == len(mask)
    # the tokens under the mask are the two answers, each followed by the end-of-document token
    learned = tokens[mask == 1].tolist()
    eod = sp_tokenizer.eod
    first = learned.index(eod)
    assert sp_tokenizer.detokenize(learned[:first]) == "The number of items."
    assert sp_tokenizer.detokenize(learned[first + 1:-1]) == "A new sorted list."
    assert learned[-1] == eod and learned.count(eod) == 2
    # what precedes each answer is the generation prompt for it
    start = int(np.argmax(mask))
    assert tokens[:start].tolist() == generation_prompt(sp_tokenizer, CHAT[:2])


def test_tokenizer_chat_template(bpe_files):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=bpe_files[2])
    tokenizer.tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")
    tokens, mask = tokenize_conversation(tokenizer, CHAT)
    hf = tokenizer.tokenizer
    text = hf.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("[system]Answer briefly.[user]")
    assert tokens.tolist() == hf(text, add_special_tokens=False).input_ids
    # each answer's tokens, and its end token, are those the template adds for it
    spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    answers = [hf.decode(tokens[a:b].tolist()) for a, b in zip(spans[::2], spans[1::2])]
    assert answers == ["The number of items.<|endoftext|>", "A new sorted list.<|endoftext|>"]


def test_pack_is_greedy_in_order():
    assert pack([5, 4, 2, 7, 1], 8) == [[0], [1, 2], [3, 4]]
    assert pack([8, 8], 8) == [[0], [1]]


def _conversation(n, first_learned):
    tokens = np.arange(10, 10 + n, dtype=np.int32)
    mask = (np.arange(n) >= first_learned).astype(np.uint8)
    return tokens, mask


def test_packed_sample_layout():
    convs = [_conversation(5, 2), _conversation(4, 1), _conversation(20, 3)]
    ds = SFTDataset(convs, seq_length=10, num_samples=None, seed=0, overlong="truncate")
    assert ds.stats.truncated == 1 and ds.stats.skipped == 0 and ds.stats.conversations == 3
    samples = [ds[i] for i in range(len(ds))]
    packed = next(s for s in samples if (s["position_ids"] == 0).sum() >= 2 and
                  s["loss_mask"][:4].sum() > 0 and s["position_ids"][4] == 0)
    # the 5-token conversation (4 positions) then the 4-token one (3), then 3 of padding
    assert packed["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert packed["tokens"][:7].tolist() == [10, 11, 12, 13, 10, 11, 12]
    assert packed["labels"][:7].tolist() == [11, 12, 13, 14, 11, 12, 13]
    assert packed["loss_mask"].tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    allowed = ~packed["attention_mask"][0]
    assert allowed[5].tolist() == [False] * 4 + [True, True] + [False] * 4
    assert allowed[3].tolist() == [True] * 4 + [False] * 6
    assert not allowed[7, :7].any()  # padding sees only padding


def test_overlong_skip_and_epochs():
    convs = [_conversation(5, 2), _conversation(30, 3), _conversation(6, 1)]
    ds = SFTDataset(convs, seq_length=8, num_samples=7, seed=3, overlong="skip")
    assert ds.stats.skipped == 1 and ds.stats.truncated == 0 and len(ds.packs) == 2
    assert len(ds) == 7
    # every epoch holds every sequence once
    for epoch in range(3):
        seen = [ds._pack_of(i) for i in range(2 * epoch, min(2 * epoch + 2, 7))]
        assert len(seen) < 2 or sorted(map(tuple, seen)) == sorted(map(tuple, ds.packs))
    again = SFTDataset(convs, seq_length=8, num_samples=7, seed=3, overlong="skip")
    assert all(torch.equal(ds[i]["tokens"], again[i]["tokens"]) for i in range(7))


@pytest.mark.parametrize("placement, positions", [("peri", "rope"), ("pre", "rope"),
                                                  ("post", "learned_absolute")])
def test_packed_losses_equal_alone(placement, positions):
    """The per-token losses of a packed sequence are those of each conversation run alone
    (fp32; attention over a masked block equals attention over the shorter sequence up to
    summation order: 1e-5)."""
    set_random_seed(11)
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                               ffn_hidden_size=64, norm_placement=placement,
                               position_embedding_type=positions,
                               rope_from_position_ids=positions == "rope",
                               max_position_embeddings=32, hidden_dropout=0.0,
                               attention_dropout=0.0, normalization="RMSNorm",
                               gated_linear_unit=True)
    model = GPTModel(config, vocab_size=64).eval()
    rng = np.random.default_rng(0)
    convs = []
    for n in (9, 6, 12):
        tokens = rng.integers(1, 64, n).astype(np.int32)
        convs.append((tokens, (np.arange(n) >= 2).astype(np.uint8)))
    ds = SFTDataset(convs, seq_length=32, num_samples=None, seed=0)
    assert len(ds.packs) == 1
    sample = ds[0]
    with torch.no_grad():
        packed = model(sample["tokens"][None], sample["position_ids"][None],
                       sample["attention_mask"][None], labels=sample["labels"][None])[0]
        at = 0
        for c in ds.packs[0]:
            tokens = torch.from_numpy(ds.conversations[c][0].astype(np.int64))
            n = len(tokens) - 1
            alone = model(tokens[None, :-1], torch.arange(n)[None], None,
                          labels=tokens[None, 1:])[0]
            torch.testing.assert_close(packed[at:at + n], alone, rtol=1e-5, atol=1e-5)
            at += n
