"""Log-likelihoods of continuations given contexts, with each context computed once.

A request is (context tokens, continuation tokens); its score is the sum of
log p(continuation token | everything before it). Requests that share a context (the choices
of one question) become one *segment* of a row:

    [ c_1 ... c_{n-1} | c_n a_1 ... a_{k-1} | c_n b_1 ... b_{m-1} | ... ]
      shared context     branch for choice a   branch for choice b

Every branch starts with a copy of the context's last token at the same position, attends to
the shared tokens and causally to itself, and is labelled with its choice's tokens: the
model's own per-token loss then is -log p of each choice token, at any tensor- or
pipeline-parallel layout (the vocabulary-parallel loss needs one label per position, hence
the copied token). Segments are packed into rows of ``seq_length`` positions (positions and
attention kept inside each segment); the rows' losses are summed back per request.

A request whose context and continuation do not fit a row is scored alone with
lm-evaluation-harness's truncation: the last ``seq_length + 1`` tokens, the continuation's
losses the last ones.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from megatron.core.datasets.sft_dataset import packed_attention_mask


@dataclass
class _Segment:
    shared: List[int]  # context tokens all branches attend to (c_1 .. c_{n-1})
    branches: List[Tuple[int, List[int], List[int]]] = field(default_factory=list)
    # (request index, branch input tokens, branch labels)
    start: int = 0  # position of the first shared token

    @property
    def length(self) -> int:
        return len(self.shared) + sum(len(b[1]) for b in self.branches)


def _segments(requests: Sequence[Tuple[Sequence[int], Sequence[int]]], seq_length: int):
    """Group requests by context into segments that fit ``seq_length`` positions."""
    by_context: Dict[Tuple[int, ...], List[int]] = {}
    for i, (context, _) in enumerate(requests):
        by_context.setdefault(tuple(context), []).append(i)
    segments = []
    for context, members in by_context.items():
        current = None
        for i in members:
            continuation = list(requests[i][1])
            if not context or not continuation:
                raise ValueError(f"request {i} has an empty context or continuation")
            branch = [context[-1]] + continuation[:-1]
            if len(context) - 1 + len(branch) > seq_length:
                segments.append(_truncated(i, list(context), continuation, seq_length))
                continue
            if current is None or current.length + len(branch) > seq_length:
                current = _Segment(shared=list(context[:-1]))
                segments.append(current)
            current.branches.append((i, branch, continuation))
    return segments


def _truncated(i: int, context: List[int], continuation: List[int], seq_length: int):
    """lm-evaluation-harness's left truncation of one request that does not fit."""
    whole = (context + continuation)[-(seq_length + 1):]
    inputs, labels = whole[:-1], whole[1:]
    k = min(len(continuation), len(labels))
    # the shared part is every input before the continuation's predictions
    shared = inputs[:len(inputs) - k]
    return _Segment(shared=shared, branches=[(i, inputs[len(inputs) - k:], labels[-k:])],
                    start=0)


@dataclass
class Row:
    tokens: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    mask: torch.Tensor  # [1, s, s] bool, True = masked
    spans: List[Tuple[int, int, int]]  # (request index, first position, end position)


def _plan_rows(requests, seq_length: int) -> List[List[_Segment]]:
    """The segments of each row (greedy, in order)."""
    rows, current, used = [], [], 0
    for seg in _segments(requests, seq_length):
        if current and used + seg.length > seq_length:
            rows.append(current)
            current, used = [], 0
        current.append(seg)
        used += seg.length
    if current:
        rows.append(current)
    return rows


def pack_rows(requests, seq_length: int, pad: int = 0) -> List[Row]:
    """Rows of ``seq_length`` positions holding every request's branch (greedy, in order)."""
    return [_row(segments, seq_length, pad) for segments in _plan_rows(requests, seq_length)]


def _row(segments: List[_Segment], s: int, pad: int) -> Row:
    tokens = np.full(s, pad, dtype=np.int64)
    labels = np.full(s, pad, dtype=np.int64)
    positions = np.zeros(s, dtype=np.int64)
    group = np.full(s, -1, dtype=np.int64)  # segment per position (-1: padding)
    branch = np.zeros(s, dtype=np.int64)  # 0: shared context, k: the k-th branch
    spans, at = [], 0
    for g, seg in enumerate(segments):
        n = len(seg.shared)
        tokens[at:at + n] = seg.shared
        positions[at:at + n] = np.arange(n)
        group[at:at + n] = g
        at += n
        for k, (i, inputs, target) in enumerate(seg.branches, 1):
            m = len(inputs)
            tokens[at:at + m], labels[at:at + m] = inputs, target
            positions[at:at + m] = np.arange(n, n + m)
            group[at:at + m], branch[at:at + m] = g, k
            spans.append((i, at, at + m))
            at += m
    positions[at:] = np.arange(s - at)
    return Row(tokens, labels, positions, packed_attention_mask(group, branch), spans)


def causal_row(tokens: Sequence[int], labels: Sequence[int], seq_length: int,
               pad: int = 0) -> Row:
    """One plain causal row: ``tokens`` predicting ``labels``, then padding (span 0, the
    labelled positions)."""
    n = len(tokens)
    ids, targets = np.full(seq_length, pad, dtype=np.int64), np.full(seq_length, pad,
                                                                     dtype=np.int64)
    ids[:n], targets[:n] = tokens, labels
    return Row(ids, targets, np.arange(seq_length),
               packed_attention_mask(np.zeros(seq_length, dtype=np.int64)), [(0, 0, n)])


def score_requests(requests, seq_length: int, batch_size: int,
                   token_losses: Callable[[List[Row]], torch.Tensor],
                   pad: int = 0) -> np.ndarray:
    """Log-likelihood of every request. ``token_losses(rows)`` runs the model on a batch of
    up to ``batch_size`` rows and returns -log p(label) per position [rows, seq_length]."""
    plan = _plan_rows(requests, seq_length)  # rows are built a batch at a time (s x s masks)
    out = np.zeros(len(requests), dtype=np.float64)
    for b in range(0, len(plan), batch_size):
        batch = [_row(segments, seq_length, pad) for segments in plan[b:b + batch_size]]
        losses = token_losses(batch).double().cpu().numpy()
        for r, row in enumerate(batch):
            for i, start, end in row.spans:
                out[i] = -losses[r, start:end].sum()
    return out


def batch_tensors(rows: List[Row], batch_size: int, seq_length: int, pad: int = 0):
    """tokens, labels, position ids [batch_size, s] and the mask [batch_size, 1, s, s] of
    ``rows``, filled up to ``batch_size`` with padding rows (fixed shapes for pipelines)."""
    full = list(rows) + [causal_row([], [], seq_length, pad)] * (batch_size - len(rows))
    return (torch.from_numpy(np.stack([r.tokens for r in full])),
            torch.from_numpy(np.stack([r.labels for r in full])),
            torch.from_numpy(np.stack([r.positions for r in full])),
            torch.stack([r.mask for r in full]))
