"""The distributed optimizer (ZeRO-1): each data-parallel rank updates only its slice.

Rank r owns the r-th slice of every gradient bucket (see DistributedDataParallel). Its
optimizer holds fp32 master copies of just those slices (for fp32 models, views of the
parameter buffer itself) and their Adam moments, so optimizer memory per rank is divided by
the data-parallel size. A step reads the reduced gradient slices, clips by the global norm,
updates the slices, and all-gathers the parameters (asynchronously under
``overlap_param_gather``: the next forward waits for each bucket before first using it).
"""

from typing import List

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.optimizer.grad_scaler import found_non_finite
from megatron.core.optimizer.optimizer import MegatronOptimizer, counts_in_grad_norm
from megatron.core.timers import get_timers


class _Piece:
    """The part of one parameter that falls in this rank's slice of one bucket."""

    def __init__(self, chunk, param, start, end):
        self.chunk, self.param = chunk, param
        self.start, self.end = start, end  # range in the chunk's buffers
        self.offset = start - chunk.param_ranges[param][0]  # range within the parameter
        self.master = None


class DistributedOptimizer(MegatronOptimizer):
    """``make_optimizer(param_groups)`` builds the torch optimizer over the master slices;
    ``model_chunks`` are DistributedDataParallel models built with
    ``use_distributed_optimizer``; ``param_groups`` are ``get_param_groups``'s (each
    parameter's slice joins its group, options kept). Collectives: data-parallel group
    (gradients, parameters, checkpoints) and the whole world (grad norm, overflow)."""

    def __init__(self, make_optimizer, model_chunks, param_groups: List[dict],
                 clip_grad: float, grad_scaler=None):
        self.chunks = model_chunks
        self.pieces: List[_Piece] = []
        for chunk in model_chunks:
            for bucket in chunk.buckets:
                lo, hi = chunk.shard_range(bucket)
                for p in bucket.params:
                    start, end = chunk.param_ranges[p]
                    if max(start, lo) < min(end, hi):
                        self.pieces.append(_Piece(chunk, p, max(start, lo), min(end, hi)))
        group_of = {p: i for i, g in enumerate(param_groups) for p in g["params"]}
        masters = [[] for _ in param_groups]
        for piece in self.pieces:
            view = piece.chunk.param_buffer[piece.start:piece.end]
            piece.master = view if view.dtype == torch.float32 else view.detach().float()
            masters[group_of[piece.param]].append(piece.master)
        param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps_}
                        for g, ps_ in zip(param_groups, masters) if ps_]
        if not param_groups:
            raise ValueError("this data-parallel rank owns no parameters: the model is too "
                             "small for the data-parallel size")
        super().__init__(make_optimizer(param_groups), clip_grad, grad_scaler)

    def _main_params(self):
        return [piece.master for piece in self.pieces]

    def _model_params(self):
        return [piece.param for piece in self.pieces]

    def _prepare_grads(self) -> bool:
        for chunk in self.chunks:  # a parameter the forward never used may still be in flight
            chunk.finish_param_sync()
        for piece in self.pieces:
            piece.master.grad = piece.chunk.grad_buffer[piece.start:piece.end].float()
        if self.grad_scaler is None:
            return False
        grads = [p.grad for p in self._main_params()]
        torch._foreach_mul_(grads, self.grad_scaler.inv_scale)
        found = torch.tensor([float(found_non_finite(grads))], device=grads[0].device)
        if dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item())

    def get_grad_norm(self) -> float:
        """Norm over every rank's slices (each parameter once): summed over the world."""
        for_norm = [p.master.grad for p in self.pieces if counts_in_grad_norm(p.param)]
        return get_grad_norm_fp32(for_norm, dist.group.WORLD if dist.is_initialized() else None)

    def _stats_group(self):
        """Each rank holds its own slices: every parameter once over the whole world."""
        return dist.group.WORLD if dist.is_initialized() else None

    def _counts_world_once(self) -> bool:
        return True

    def _after_step(self) -> None:
        for piece in self.pieces:
            view = piece.chunk.param_buffer[piece.start:piece.end]
            if view.data_ptr() != piece.master.data_ptr():
                view.copy_(piece.master)
        timers = get_timers()
        timers("params-all-gather", log_level=1).start(barrier=timers.barrier_with_L1_time)
        for chunk in self.chunks:
            chunk.start_param_sync()
        timers("params-all-gather").stop()

    @torch.no_grad()
    def reload_model_params(self) -> None:
        for chunk in self.chunks:
            chunk.finish_param_sync()
        for piece in self.pieces:
            view = piece.chunk.param_buffer[piece.start:piece.end]
            if view.data_ptr() != piece.master.data_ptr():
                piece.master.copy_(view)

    # --- checkpoints: whole per-parameter tensors, gathered on data-parallel rank 0 ---------
    def _piece_value(self, piece, key):
        if key == "fp32_param":
            return piece.master
        return self.optimizer.state.get(piece.master, {}).get(key, torch.zeros_like(piece.master))

    def param_state(self):
        """Collective over the data-parallel group: {model parameter: {"exp_avg",
        "exp_avg_sq"[, "fp32_param"]}} of whole (tensor-parallel-local) parameters on
        data-parallel rank 0; None on the other ranks."""
        for chunk in self.chunks:  # the fp32 masters are views of the gathered buffer
            chunk.finish_param_sync()
        keys = ["exp_avg", "exp_avg_sq"]
        if any(p.master.data_ptr() != p.chunk.param_buffer[p.start:p.end].data_ptr()
               for p in self.pieces[:1]):
            keys.append("fp32_param")  # bf16/fp16 model: the masters are separate copies
        mine = ps.get_data_parallel_rank(with_context_parallel=True) == 0
        out = {} if mine else None
        for chunk in self.chunks:
            flats = {key: self._gather_chunk(chunk, key) for key in keys}
            if mine:
                for p in chunk.module.parameters():
                    start, end = chunk.param_ranges[p]
                    out[p] = {key: flat[start:end].view_as(p) for key, flat in flats.items()}
        return out

    def _gather_chunk(self, chunk, key) -> torch.Tensor:
        """The chunk-sized fp32 buffer of ``key`` assembled from every rank's slices."""
        flat = torch.zeros(chunk.grad_buffer.numel(), dtype=torch.float32,
                           device=chunk.grad_buffer.device)
        for piece in self.pieces:
            if piece.chunk is chunk:
                flat[piece.start:piece.end] = self._piece_value(piece, key)
        if chunk.dp_size > 1:
            for bucket in chunk.buckets:
                shards = list(flat[bucket.start:bucket.end].chunk(chunk.dp_size))
                mine = shards[chunk.dp_rank].clone()
                dist.all_gather(shards, mine, group=chunk.dp_group)
        return flat

    @torch.no_grad()
    def load_param_state(self, saved_for, common: dict) -> None:
        """Take this rank's slices of the whole per-parameter state ``saved_for(param)``
        gives (saved at any data-parallel size, with or without this optimizer)."""
        for piece in self.pieces:
            saved = saved_for(piece.param)
            n = piece.end - piece.start
            cut = {key: value.reshape(-1)[piece.offset:piece.offset + n]
                   for key, value in saved.items()}
            model_slice = piece.chunk.param_buffer[piece.start:piece.end]
            self._restore(piece.master, cut, model_slice, common["step"])
        if self.grad_scaler is not None and "grad_scaler" in common:
            self.grad_scaler.load_state_dict(common["grad_scaler"])
        self._after_step()  # model parameters = the loaded master values
        for chunk in self.chunks:
            chunk.finish_param_sync()
