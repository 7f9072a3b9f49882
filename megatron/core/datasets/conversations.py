"""Fine-tuning conversations: reading and checking them, and the chat template that turns
each into tokens and a loss mask (1 on the assistant's tokens). Needs neither torch nor the
model code (tools/preprocess_data.py --chat uses it).

Input: JSONL, one conversation per line, either

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}            (optionally "system": "...")

Chat template. With a Hugging Face tokenizer that has a chat template, that template (the
tokens of each assistant message are those the template adds for it, found by rendering the
conversation up to and after each message). Otherwise the default template, in which each
message is

    <|system|>\n{content}\n      <|user|>\n{content}\n      <|assistant|>\n{content}<eod>

each piece tokenized on its own; the loss is on the assistant's content and the end-of-
document token after it, so the model learns to end its turn. A prompt asks for an answer by
ending with ``<|assistant|>\n`` (:func:`generation_prompt`).
"""

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

ROLES = ("system", "user", "assistant")
CHAT_DATASET = "conversations_document"  # tools/preprocess_data.py --chat's output names
LOSS_MASK_SUFFIX = "_loss_mask"


class SFTDataError(ValueError):
    """Malformed fine-tuning data: the message names the file, the line and the problem."""


# ------------------------------------------------------------------ reading
def conversation_of(record) -> List[Dict[str, str]]:
    """The messages of one JSONL record, checked (SFTDataError says what is wrong)."""
    if not isinstance(record, dict):
        raise SFTDataError(f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise SFTDataError("\"messages\" must be a non-empty list of "
                               "{\"role\", \"content\"} objects")
    elif "prompt" in record and "response" in record:
        messages = ([{"role": "system", "content": record["system"]}]
                    if record.get("system") else [])
        messages += [{"role": "user", "content": record["prompt"]},
                     {"role": "assistant", "content": record["response"]}]
    else:
        raise SFTDataError(f"expected \"messages\", or \"prompt\" and \"response\" "
                           f"(found keys {sorted(record)})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SFTDataError(f"message {i} is not a {{\"role\", \"content\"}} "
                               "object")
        if m["role"] not in ROLES:
            raise SFTDataError(f"message {i} has the unknown role {m['role']!r} "
                               f"(expected {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise SFTDataError(f"message {i}'s content is "
                               f"{type(m['content']).__name__}, not a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise SFTDataError("the conversation has no assistant turn, so it has "
                           "nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str) -> List[List[Dict[str, str]]]:
    """Every conversation of a JSONL file (blank lines skipped), checked; the first problem
    raises SFTDataError naming the file and line."""
    if not os.path.isfile(path):
        raise SFTDataError(f"{path}: no such file")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") \
                    from None
            try:
                conversations.append(conversation_of(record))
            except SFTDataError as e:
                raise SFTDataError(f"{where}: {e}") from None
    if not conversations:
        raise SFTDataError(f"{path}: no conversations in the file")
    return conversations


# ------------------------------------------------------------------ chat templates
def _hf(tokenizer):
    """The transformers tokenizer inside our HuggingFaceTokenizer, else None."""
    hf = getattr(tokenizer, "tokenizer", None)
    return hf if hasattr(hf, "encode") else None


def _encode(tokenizer, text: str) -> List[int]:
    """Token ids of ``text`` alone (no special tokens added)."""
    hf = _hf(tokenizer)
    if hf is not None:
        return hf(text, add_special_tokens=False).input_ids
    return list(tokenizer.tokenize(text))


def _header(role: str) -> str:
    return f"<|{role}|>\n"


def generation_prompt(tokenizer, messages: Sequence[Dict[str, str]]) -> List[int]:
    """The tokens that ask the model for the next assistant turn after ``messages`` (with
    the same template as training)."""
    if uses_tokenizer_template(tokenizer):
        return _render(_hf(tokenizer), messages, True)
    tokens = _bos(tokenizer)
    for m in messages:
        tokens += _encode(tokenizer, _header(m["role"])) + _encode(tokenizer, m["content"])
        tokens += [tokenizer.eod] if m["role"] == "assistant" else _encode(tokenizer, "\n")
    return tokens + _encode(tokenizer, _header("assistant"))


def uses_tokenizer_template(tokenizer) -> bool:
    hf = _hf(tokenizer)
    return hf is not None and bool(getattr(hf, "chat_template", None))


def _bos(tokenizer) -> List[int]:
    hf = _hf(tokenizer)
    bos = getattr(hf, "bos_token_id", None) if hf is not None else None
    return [bos] if bos is not None and bos != tokenizer.eod else []


def tokenize_conversation(tokenizer, messages) -> Tuple[np.ndarray, np.ndarray]:
    """(token ids int32, loss mask uint8): 1 on the tokens the model learns to produce
    (the assistant's), 0 elsewhere."""
    if uses_tokenizer_template(tokenizer):
        return _tokenize_with_template(_hf(tokenizer), messages)
    tokens = _bos(tokenizer)
    mask = [0] * len(tokens)
    for m in messages:
        head = _encode(tokenizer, _header(m["role"]))
        body = _encode(tokenizer, m["content"])
        if m["role"] == "assistant":
            tail, learn = [tokenizer.eod], 1
        else:
            tail, learn = _encode(tokenizer, "\n"), 0
        tokens += head + body + tail
        mask += [0] * len(head) + [learn] * (len(body) + len(tail))
    return np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


def _render(hf, messages, prompt: bool) -> List[int]:
    """The chat template's text for ``messages``, tokenized (the template writes its own
    special tokens, so none are added)."""
    text = hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=prompt)
    return hf(text, add_special_tokens=False).input_ids


def _tokenize_with_template(hf, messages) -> Tuple[np.ndarray, np.ndarray]:
    """The tokenizer's chat template: each assistant message's tokens are those that
    rendering up to it with the generation prompt lacks and rendering through it has."""
    tokens = _render(hf, messages, False)
    mask = np.zeros(len(tokens), dtype=np.uint8)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = _render(hf, messages[:i], True), _render(hf, messages[:i + 1], False)
        if tokens[:len(before)] != before or tokens[:len(through)] != through:
            raise SFTDataError("the tokenizer's chat template does not render a conversation "
                               "as the prefix of its continuation, so the assistant's tokens "
                               "cannot be found; use a tokenizer without a chat template for "
                               "the default one")
        mask[len(before):len(through)] = 1
    return np.asarray(tokens, dtype=np.int32), mask
