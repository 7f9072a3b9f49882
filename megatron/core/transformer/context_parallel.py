"""Context parallelism: each rank of the context-parallel (CP) group holds 1/N of every sequence.

The sequence is cut into 2N chunks and rank r holds chunks r and 2N-1-r, so every rank holds
as many early (cheap) as late (expensive) rows of causal attention -- Megatron-LM's and
TransformerEngine's load balancing:

    N = 2, s = 8:   positions  0 1 | 2 3 | 4 5 | 6 7
                    rank 0 holds chunks 0 and 3: 0 1 6 7;  rank 1 chunks 1 and 2: 2 3 4 5

Everything but attention is per token and needs nothing more: norms, MLP, the embedding (with
each token's global position id), RoPE (rotated by the global position) and the loss (its sums
reduced over the group). Attention needs every earlier key and value: :func:`attention` gets
them around a ring (``p2p``: rank r sends the block it holds to r + 1 while attending to it, N
steps) or all at once (``all_gather``), and merges the partial results by their log-sum-exp.
Backward runs the same ring; each block's key/value gradients travel with it back to their
owner.

Attention dropout drops (query, key) pairs by a hash of the step's seed and the pair's batch
row, global head and global positions, so the pairs dropped do not depend on how the sequence
or the heads are split (``--context-parallel-size``, ``--cp-comm-type``, the tensor-parallel
size), and backward finds the same ones without storing them.

Masks: plain causal attention, or causal attention within documents given as *document ids*
(an integer [b, s] tensor: token i attends to j <= i when both carry the same id), which is
what ``--reset-attention-mask`` and packed SFT samples are. The ids cover the whole sequence on
every rank (s numbers, not s^2), so any block's mask can be built where it is needed
(``gpt_dataset.document_ids`` makes them from end-of-document tokens). A dense
[b, 1, s, s] mask cannot be split this way and is refused.
"""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.core import ConfigError
from megatron.core import parallel_state as ps
from megatron.core.datasets.gpt_dataset import document_attention_mask  # noqa: F401 (the model's)

COMM_TYPES = ("p2p", "all_gather")
COMM_TYPE_ALIASES = {"allgather": "all_gather"}  # Megatron-LM's spelling
SPLIT_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""Batch entries of shape [b, s] that each rank keeps its chunks of (``document_ids`` stays
whole: attention looks up the ids of the keys it receives)."""
DENSE_MASK_ERROR = (
    "context parallelism cannot split a dense [b, 1, s, s] attention mask across ranks; give "
    "causal attention (no mask) or document ids (--reset-attention-mask, --sft), or use "
    "--context-parallel-size 1.")
_TILE_ELEMENTS = 1 << 24
"""Attention scores computed at once (64 MiB in fp32): rows are processed in tiles this size."""
_TILE_ROWS = 256
"""At most this many query rows per tile, so causal blocks skip most of their masked half."""
_KV_TAG, _GRAD_TAG = 71, 72  # ring messages (the pipeline's p2p uses its own tags)


def check_sequence_length(seq_length: int, context_parallel_size: int,
                          sequence_parallel_size: int = 1) -> None:
    """Raise ConfigError unless ``seq_length`` splits into 2 x CP chunks (each divisible by
    the tensor-parallel size under sequence parallelism)."""
    need = 2 * context_parallel_size * sequence_parallel_size
    if seq_length % need:
        what = f"2 x context_parallel_size={context_parallel_size}"
        if sequence_parallel_size > 1:
            what += (f" x tensor_model_parallel_size={sequence_parallel_size} (sequence "
                     "parallelism splits each rank's part again)")
        raise ConfigError(f"seq_length={seq_length} is not divisible by {what}; context "
                          f"parallelism cuts every sequence into {2 * context_parallel_size} "
                          "equal chunks.")


def local_positions(seq_length: int, cp_size: int, cp_rank: int,
                    device=None) -> torch.Tensor:
    """The global positions of the tokens rank ``cp_rank`` holds, in its order (ascending):
    chunks cp_rank and 2 x cp_size - 1 - cp_rank."""
    c = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    last = (2 * cp_size - 1 - cp_rank) * c
    return torch.cat([first, torch.arange(last, last + c, device=device)])


def split_batch(batch: Dict[str, torch.Tensor], cp_size: Optional[int] = None,
                cp_rank: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """This context-parallel rank's part of a batch (Megatron-LM's get_batch_on_this_cp_rank):
    its chunks of every [b, s] entry in ``SPLIT_KEYS``; ``document_ids`` whole. Raises
    ConfigError for a dense ``attention_mask``. The batch itself at CP size 1."""
    cp_size = ps.get_context_parallel_world_size() if cp_size is None else cp_size
    cp_rank = ps.get_context_parallel_rank() if cp_rank is None else cp_rank
    if cp_size == 1:
        return batch
    if batch.get("attention_mask") is not None:
        raise ConfigError(DENSE_MASK_ERROR)
    s = batch["tokens"].shape[1]
    check_sequence_length(s, cp_size)
    index = local_positions(s, cp_size, cp_rank, device=batch["tokens"].device)
    return {k: v.index_select(1, index) if k in SPLIT_KEYS else v for k, v in batch.items()}


def is_document_ids(mask: Optional[torch.Tensor]) -> bool:
    """Whether an attention-mask argument holds document ids ([b, s] integers) rather than
    Megatron's dense boolean [b, 1, s, s] mask."""
    return mask is not None and mask.dim() == 2 and not mask.dtype.is_floating_point and \
        mask.dtype != torch.bool


# --- the attention kernel: one query block against one key/value block, by row tiles --------
class _Block:
    """The tokens of one block: global positions (ascending) and document ids [b, n] or None."""

    def __init__(self, positions: torch.Tensor, ids: Optional[torch.Tensor]):
        self.positions, self.ids = positions, ids


def _tiles(q: _Block, kv: _Block, rows_per_tile: int):
    """(r0, r1, c1) per tile of query rows: keys 0..c1-1 are the only ones a row in r0..r1-1
    may see (positions ascend on both sides); tiles never straddle the query's two chunks."""
    n = q.positions.numel()
    half = n // 2
    for start, end in ((0, half), (half, n)):
        for r0 in range(start, end, rows_per_tile):
            r1 = min(r0 + rows_per_tile, end)
            c1 = int(torch.searchsorted(kv.positions, q.positions[r1 - 1], right=True))
            if c1 > 0:
                yield r0, r1, c1


def _allowed(q: _Block, kv: _Block, r0: int, r1: int, c1: int) -> Optional[torch.Tensor]:
    """[b or 1, 1, 1, rows, c1] where attention is allowed, or None when everything is."""
    qp, kp = q.positions[r0:r1], kv.positions[:c1]
    allowed = None
    if int(kp[-1]) > int(qp[0]):  # some key lies after some query of the tile
        allowed = (qp[:, None] >= kp[None, :])[None]
    if q.ids is not None:
        same = q.ids[:, r0:r1, None] == kv.ids[:, None, :c1]
        allowed = same if allowed is None else allowed & same
    return None if allowed is None else allowed[:, None, None]


class _Dropout:
    """Which (query, key) pairs attention dropout keeps: a 32-bit integer hash of ``seed``, the
    batch row, the global head (``head_offset`` + local head) and both global positions,
    kept when at or above ``p`` x 2^32."""

    _M = 0xFFFFFFFF

    def __init__(self, p: float, seed: int, head_offset: int):
        self.p, self.seed, self.head_offset = p, seed, head_offset
        self.threshold = int(p * 2 ** 32)

    @classmethod
    def _mix(cls, x: torch.Tensor) -> torch.Tensor:
        """A bijective mix of 32-bit values held in int64 (no product exceeds 2^59)."""
        x = ((x >> 16) ^ x) * 0x45D9F3B & cls._M
        x = ((x >> 16) ^ x) * 0x45D9F3B & cls._M
        return (x >> 16) ^ x

    def keep(self, b: int, hk: int, g: int, q_pos: torch.Tensor,
             k_pos: torch.Tensor) -> torch.Tensor:
        """bool [b, hk, g, t, c] for queries at q_pos [t] and keys at k_pos [c]."""
        device = q_pos.device
        heads = self.head_offset + torch.arange(hk * g, device=device).view(1, hk, g)
        rows = torch.arange(b, device=device).view(b, 1, 1) * 65536 + heads
        h = self._mix((rows ^ self.seed) & self._M)
        h = self._mix(h[..., None] ^ q_pos.view(1, 1, 1, -1))
        return self._mix(h[..., None] ^ k_pos.view(1, 1, 1, 1, -1)) >= self.threshold

    def apply(self, p: torch.Tensor, qb: "_Block", kb: "_Block", r0, r1, c1) -> torch.Tensor:
        """The probabilities p [b, hk, g, t, c1] with the dropped pairs zeroed and the rest
        scaled by 1 / (1 - p)."""
        b, hk, g = p.shape[:3]
        keep = self.keep(b, hk, g, qb.positions[r0:r1], kb.positions[:c1])
        return p.mul_(keep).mul_(1.0 / (1.0 - self.p))


def _rows_per_tile(q: torch.Tensor, sk: int) -> int:
    b, hk, g, _, _ = q.shape
    return max(1, min(_TILE_ROWS, _TILE_ELEMENTS // max(1, b * hk * g * sk)))


def _scores(q, k, r0, r1, c1, scale, allowed):
    b, hk, g, _, d = q.shape
    t = r1 - r0
    scores = torch.matmul(q[:, :, :, r0:r1].reshape(b, hk, g * t, d),
                          k[:, :, :c1].transpose(-1, -2)).view(b, hk, g, t, c1).float()
    scores.mul_(scale)
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    return scores


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def _block_forward(q, k, v, qb: _Block, kb: _Block, scale, out, lse,
                   drop: Optional[_Dropout] = None) -> None:
    """Attend q [b, hk, g, sq, d] to k, v [b, hk, sk, d] where allowed, merging into the running
    out [b, hk, g, sq, d] and lse [b, hk, g, sq] (fp32, in place)."""
    b, hk, g, _, d = q.shape
    for r0, r1, c1 in _tiles(qb, kb, _rows_per_tile(q, k.shape[2])):
        scores = _scores(q, k, r0, r1, c1, scale, _allowed(qb, kb, r0, r1, c1))
        m = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - _finite(m)[..., None])
        if drop is not None:  # the normalizer (lse) counts every pair, as in softmax-then-drop
            p = drop.apply(p, qb, kb, r0, r1, c1)
        t = r1 - r0
        o = torch.matmul(p.to(v.dtype).view(b, hk, g * t, c1), v[:, :, :c1])
        o = o.view(b, hk, g, t, d).float()
        old = lse[..., r0:r1]
        new = torch.logaddexp(old, m)
        safe = _finite(new)
        acc = out[:, :, :, r0:r1]
        acc.mul_(torch.exp(old - safe)[..., None]).add_(o * torch.exp(m - safe)[..., None])
        lse[..., r0:r1] = new


def _block_backward(q, k, v, dout, lse, delta, qb: _Block, kb: _Block, scale,
                    dq, dk, dv, drop: Optional[_Dropout] = None) -> None:
    """Gradients of one block (flash attention's backward with the merged ``lse`` and
    ``delta`` = rowsum(dout * out)), added into dq [b, hk, g, sq, d] and dk, dv [b, hk, sk, d]
    (fp32)."""
    b, hk, g, _, d = q.shape
    for r0, r1, c1 in _tiles(qb, kb, _rows_per_tile(q, k.shape[2])):
        t = r1 - r0
        scores = _scores(q, k, r0, r1, c1, scale, _allowed(qb, kb, r0, r1, c1))
        p = torch.exp(scores - lse[..., r0:r1, None])  # masked entries: exp(-inf) = 0
        do = dout[:, :, :, r0:r1].reshape(b, hk, g * t, d)
        dp = torch.matmul(do, v[:, :, :c1].transpose(-1, -2)).view(b, hk, g, t, c1).float()
        if drop is None:
            pt = p.view(b, hk, g * t, c1)
        else:  # dropped pairs: no gradient through them, the kept ones scaled alike
            pt = drop.apply(p.clone(), qb, kb, r0, r1, c1).view(b, hk, g * t, c1)
            dp = drop.apply(dp, qb, kb, r0, r1, c1)
        dv[:, :, :c1] += torch.matmul(pt.transpose(-1, -2).to(do.dtype), do).float()
        ds = p.mul_(dp.sub_(delta[..., r0:r1, None])).mul_(scale)
        ds = ds.view(b, hk, g * t, c1).to(q.dtype)
        dq[:, :, :, r0:r1] += torch.matmul(ds, k[:, :, :c1]).view(b, hk, g, t, d).float()
        qt = q[:, :, :, r0:r1].reshape(b, hk, g * t, d)
        dk[:, :, :c1] += torch.matmul(ds.transpose(-1, -2), qt).float()


# --- communication ----------------------------------------------------------------------------
class _Ring:
    """Sends to the next context-parallel rank and receives from the previous one."""

    def __init__(self):
        ranks, me = ps.get_context_parallel_global_ranks(), ps.get_context_parallel_rank()
        self.group = ps.get_context_parallel_group()
        self.next, self.prev = ranks[(me + 1) % len(ranks)], ranks[(me - 1) % len(ranks)]

    def shift(self, tensor: torch.Tensor, tag: int):
        """Start sending ``tensor`` on and receiving its predecessor's; returns (works, the
        receive buffer, ``tensor`` -- kept alive until the works are waited for)."""
        buffer = torch.empty_like(tensor)
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
            dist.P2POp(dist.irecv, buffer, self.prev, self.group, tag)])
        return works, buffer, tensor


def _wait(works) -> None:
    for work in works:
        work.wait()


class _ContextParallelAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + causal/document mask) v over the whole sequence, for this
    rank's queries; q [b, hq, sq, d], k, v [b, hk, sq, d] (hq a multiple of hk, each query
    group's heads adjacent), ``ids`` the document ids [b, s] or None; attention dropout
    ``dropout_p`` with the heads numbered from ``head_offset``."""

    @staticmethod
    def forward(ctx, q, k, v, ids, comm_type, dropout_p, head_offset):
        n, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        drop = None
        if dropout_p > 0.0:  # the default generator: in step on every rank that shares heads
            seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
            drop = _Dropout(dropout_p, seed, head_offset)
        b, hq, sq, d = q.shape
        hk = k.shape[1]
        seq = sq * n
        q5 = q.reshape(b, hk, hq // hk, sq, d)
        k, v = k.contiguous(), v.contiguous()
        blocks = [_Block(p, None if ids is None else ids[:, p])
                  for p in (local_positions(seq, n, j, q.device) for j in range(n))]
        scale = d ** -0.5
        out = torch.zeros(q5.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q5.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        if comm_type == "all_gather":
            whole = _gather_sequence(torch.stack([k, v]), n)
            everything = _Block(torch.arange(seq, device=q.device), ids)
            _block_forward(q5, whole[0], whole[1], blocks[r], everything, scale, out, lse,
                           drop)
        else:
            ring, kv = _Ring(), torch.stack([k, v])
            for i in range(n):
                pending = ring.shift(kv, _KV_TAG) if i + 1 < n else None
                _block_forward(q5, kv[0], kv[1], blocks[r], blocks[(r - i) % n], scale, out,
                               lse, drop)
                if pending is not None:
                    _wait(pending[0])
                    kv = pending[1]
        out = out.to(q.dtype)
        ctx.save_for_backward(q5, k, v, out, lse, ids)
        ctx.comm_type, ctx.blocks, ctx.scale, ctx.drop = comm_type, blocks, scale, drop
        return out.view(b, hq, sq, d)

    @staticmethod
    def backward(ctx, dout):
        q5, k, v, out, lse, ids = ctx.saved_tensors
        n, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        blocks, scale, drop = ctx.blocks, ctx.scale, ctx.drop
        dout = dout.reshape(q5.shape).to(q5.dtype)
        delta = (dout.float() * out.float()).sum(dim=-1)
        dq = torch.zeros(q5.shape, dtype=torch.float32, device=q5.device)
        if ctx.comm_type == "all_gather":
            seq = q5.shape[3] * n
            whole = _gather_sequence(torch.stack([k, v]), n)
            dwhole = torch.zeros(whole.shape, dtype=torch.float32, device=q5.device)
            everything = _Block(torch.arange(seq, device=q5.device), ids)
            _block_backward(q5, whole[0], whole[1], dout, lse, delta, blocks[r], everything,
                            scale, dq, dwhole[0], dwhole[1], drop)
            dkv = _scatter_sequence(dwhole, n, r)
        else:
            ring, kv = _Ring(), torch.stack([k, v])
            grads = None  # (works, buffer, sent): the block's key/value gradients coming in
            for i in range(n):
                pending = ring.shift(kv, _KV_TAG) if i + 1 < n else None
                dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
                _block_backward(q5, kv[0], kv[1], dout, lse, delta, blocks[r],
                                blocks[(r - i) % n], scale, dq, dkv[0], dkv[1], drop)
                if grads is not None:  # what the block's earlier holders added
                    _wait(grads[0])
                    dkv += grads[1]
                if n > 1:  # on to the block's next holder (after the last step: its owner)
                    grads = ring.shift(dkv, _GRAD_TAG)
                if pending is not None:
                    _wait(pending[0])
                    kv = pending[1]
            if grads is not None:
                _wait(grads[0])
                dkv = grads[1]  # this rank's own block, back from its last holder
        dq = dq.to(q5.dtype).view(q5.shape[0], -1, *q5.shape[3:])
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def _gather_sequence(local: torch.Tensor, n: int) -> torch.Tensor:
    """[2, b, h, s/n, d] per rank -> [2, b, h, s, d] in sequence order (all-gather)."""
    if n == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local, group=ps.get_context_parallel_group())
    c = local.shape[3] // 2
    chunks = [p[:, :, :, :c] for p in parts] + [p[:, :, :, c:] for p in reversed(parts)]
    return torch.cat(chunks, dim=3)


def _scatter_sequence(whole: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """The sum over ranks of [2, b, h, s, d] gradients, this rank's chunks (reduce-scatter)."""
    if n == 1:
        return whole
    dist.all_reduce(whole, group=ps.get_context_parallel_group())
    index = local_positions(whole.shape[3], n, r, whole.device)
    return whole.index_select(3, index)


@torch.compiler.disable
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              document_ids: Optional[torch.Tensor] = None, comm_type: str = "p2p",
              dropout_p: float = 0.0, head_offset: int = 0) -> torch.Tensor:
    """Causal attention (within documents when ``document_ids`` [b, s] is given) of this
    context-parallel rank's queries over the whole sequence: q [b, heads, s/N, d], k and v
    [b, query groups, s/N, d] as this rank holds them -> [b, heads, s/N, d]. ``dropout_p``:
    attention dropout (its seed drawn from torch's default generator), the local heads being
    global heads ``head_offset`` onwards (tensor parallelism). Collective over the
    context-parallel group (every rank calls it, layer by layer, in the same order)."""
    if comm_type not in COMM_TYPES:
        raise ConfigError(f"cp_comm_type={comm_type!r}: choose one of {', '.join(COMM_TYPES)}.")
    if document_ids is not None and not is_document_ids(document_ids):
        raise ConfigError(DENSE_MASK_ERROR)
    return _ContextParallelAttention.apply(q, k, v, document_ids, comm_type, float(dropout_p),
                                           int(head_offset))


def normalize_comm_types(comm_type, num_layers: int) -> List[str]:
    """One communication type per layer from Megatron-LM's --cp-comm-type (one value for all
    layers, or one per layer); raises ConfigError."""
    types = [comm_type] if isinstance(comm_type, str) else list(comm_type)
    types = [COMM_TYPE_ALIASES.get(t, t) for t in types]
    for t in types:
        if t not in COMM_TYPES:
            raise ConfigError(f"cp_comm_type={t!r} is not available here; choose p2p (a ring "
                              "that overlaps each transfer with attention) or all_gather.")
    if len(types) == 1:
        types *= num_layers
    if len(types) != num_layers:
        raise ConfigError(f"cp_comm_type has {len(types)} values for num_layers={num_layers}; "
                          "give one value, or one per layer.")
    return types
