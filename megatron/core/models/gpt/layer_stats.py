"""Per-layer statistics of one training step: the evidence the Peri-LN paper rests on.

For the embedding output and every transformer layer (by its global number), the mean,
variance, RMS and max |x| over all elements of the global batch of

- the residual stream after the layer (``residual``),
- each sublayer's output before it joins the residual stream (``attention``, ``mlp``; for
  Peri-LN also after its output norm, ``attention_normed``, ``mlp_normed``: the layer class
  names them in ``sublayer_outputs``);

the gradient norm of each layer's parameters (0: embedding, num_layers + 1: final norm and
output layer), the mean and standard deviation of every norm's gain, and under FP8 the
fractions of each layer's quantized inputs, weights and output gradients that saturated
(above the format's maximum) or underflowed to zero (``fp8``).

Sums, sums of squares and counts are accumulated per micro-batch (fp32 reductions, added in
float64) and summed over the ranks that hold distinct elements; maxima are taken over all
ranks. So the values are the same, to rounding, under any tensor, sequence, pipeline or data
parallel layout. Forward hooks exist only between ``start()`` and ``stop()``: other steps
pay nothing.

    collector = LayerStatsCollector(model_chunks, config)
    collector.start()
    ... forward and backward of every micro-batch ...
    collector.stop()
    optimizer.step(before_update=lambda norm: collector.record_grads(optimizer) or False)
    layers = collector.reduce()       # collective: every rank gets the same list
"""

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state as ps
from megatron.core.extensions.transformer_engine import FUSED_NORM_NAMES
from megatron.core.fp8 import ROLES as FP8_ROLES
from megatron.core.fp8 import fp8_metas
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.layer import LAYER_CLASSES
from megatron.core.transformer.norms import fused_norm_gain, is_norm, norm_gain

SITES = ("residual", "attention", "attention_normed", "mlp", "mlp_normed")
_SITE = {name: i for i, name in enumerate(SITES)}


def _gain_names() -> tuple:
    """Every norm name a layer (or the embedding, or the output stage) can hold, in one fixed
    order shared by all ranks."""
    names = ["embedding_norm", "final_layernorm"]
    for cls in LAYER_CLASSES.values():
        names += [n for n in cls.norm_names if n not in names]
    return tuple(names + ["self_attention.q_layernorm", "self_attention.k_layernorm"])


GAIN_NAMES = _gain_names()
_GAIN = {name: i for i, name in enumerate(GAIN_NAMES)}


class LayerStatsCollector:
    """Collects one step's statistics on this rank's model chunks (``GPTModel`` or a wrapper
    whose ``.module`` is one) and combines them over all ranks in ``reduce()``."""

    def __init__(self, chunks: Sequence[nn.Module], config: TransformerConfig):
        self.chunks = [getattr(c, "module", c) for c in chunks]
        self.config = config
        self.num_entries = config.num_layers + 2  # embedding, layers 1..L, output
        self.device = next(self.chunks[0].parameters()).device
        self._hooks = []
        self._entry_of: Dict[torch.Tensor, int] = {}
        self._sites = []  # (module, entry, site index)
        self._norms = []  # (module, entry, gain index, its gain function)
        self._fp8 = []  # (FP8Meta, entry): the FP8 linear layers
        for gpt in self.chunks:
            if gpt.pre_process:
                self._add_entry(gpt.embedding, 0)
                self._sites.append((gpt.embedding, 0, _SITE["residual"]))
            for layer in gpt.decoder.layers:
                self._add_entry(layer, layer.layer_number)
                self._fp8 += [(meta, layer.layer_number) for meta in fp8_metas(layer)]
                self._sites.append((layer, layer.layer_number, _SITE["residual"]))
                for site, name in layer.sublayer_outputs.items():
                    self._sites.append((getattr(layer, name), layer.layer_number, _SITE[site]))
            last = config.num_layers + 1
            if gpt.decoder.final_layernorm is not None:
                self._add_entry(gpt.decoder.final_layernorm, last)
            if gpt.post_process:
                self._add_entry(gpt.output_layer, last)
        self._reset()

    def _add_entry(self, module: nn.Module, entry: int) -> None:
        for name, sub in module.named_modules():
            if is_norm(sub) and norm_gain(sub) is not None:
                key = name or "final_layernorm"  # the block's final norm is hooked whole
                if key in _GAIN:
                    self._norms.append((sub, entry, _GAIN[key], norm_gain))
            elif fused_norm_gain(sub) is not None:  # TE's LayerNormLinear: the layer's N_in
                key = FUSED_NORM_NAMES[f"{name}.layer_norm_weight"].rsplit(".", 1)[0]
                self._norms.append((sub, entry, _GAIN[key], fused_norm_gain))
        for param in module.parameters():
            self._entry_of.setdefault(param, entry)

    def _reset(self) -> None:
        shape = (self.num_entries, len(SITES))
        kw = {"dtype": torch.float64, "device": self.device}
        self._sums = torch.zeros(shape + (3,), **kw)  # count, sum, sum of squares
        self._max = torch.zeros(shape, **kw)
        self._gains = torch.zeros((self.num_entries, len(GAIN_NAMES), 3), **kw)
        self._grad_sq = torch.zeros(self.num_entries, **kw)
        self._grads_recorded = False  # not on a step the fp16 loss scaler skipped
        # FP8 quantizations: saturated, underflowed, elements, per entry and role
        self._fp8_counts = torch.zeros((self.num_entries, len(FP8_ROLES), 3), **kw)

    def parameter_entry(self, param: torch.Tensor) -> int:
        """The entry (0 embedding, 1..L layers, L + 1 output) a model parameter belongs to."""
        return self._entry_of[param]

    # --- one step --------------------------------------------------------------------------
    def start(self) -> None:
        """Zero the accumulators and hook every recorded module's forward."""
        self._reset()
        for module, entry, site in self._sites:
            self._hooks.append(module.register_forward_hook(self._hook(entry, site)))
        for meta, _ in self._fp8:
            meta.reset_counts()
            meta.set_counting(True)

    def _hook(self, entry: int, site: int):
        def hook(module, inputs, output):
            self._accumulate(entry, site, output.detach())
        return hook

    @torch.no_grad()
    def _accumulate(self, entry: int, site: int, x: torch.Tensor) -> None:
        row = self._sums[entry, site]
        row[0] += x.numel()
        row[1] += x.sum(dtype=torch.float32)
        row[2] += torch.linalg.vector_norm(x, dtype=torch.float32).square()
        lo, hi = torch.aminmax(x)
        self._max[entry, site] = torch.maximum(self._max[entry, site],
                                               torch.maximum(-lo, hi).double())

    @torch.no_grad()
    def stop(self) -> None:
        """Remove the hooks; record the norms' gains (as the step's forward used them)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for meta, entry in self._fp8:
            meta.set_counting(False)
            for i, role in enumerate(FP8_ROLES):
                self._fp8_counts[entry, i] += torch.tensor(
                    meta.counts()[role], dtype=torch.float64, device=self.device)
        for module, entry, index, gain_of in self._norms:
            gain = gain_of(module).double()
            self._gains[entry, index] += torch.stack(
                [torch.tensor(float(gain.numel()), dtype=torch.float64, device=gain.device),
                 gain.sum(), gain.square().sum()]).to(self.device)

    def record_grads(self, optimizer) -> None:
        """This rank's share of each entry's squared gradient norm; call from the optimizer
        step's ``before_update`` (the gradients are unscaled and not yet clipped there)."""
        self._grad_sq = optimizer.grad_square_sums(self.parameter_entry, self.num_entries) \
            .to(self.device)
        self._grads_recorded = True

    @torch.no_grad()
    def reduce(self) -> List[dict]:
        """Collective over all ranks: the step's statistics, one dict per entry (see the
        module docstring and the layer_stats.jsonl format in megatron/training/layer_stats.py).
        """
        sums, gains = self._sums.clone(), self._gains.clone()
        tp_rank = ps.get_tensor_model_parallel_rank()
        if tp_rank != 0 and not (self.config.sequence_parallel and
                                 self.config.tensor_model_parallel_size > 1):
            sums.zero_()  # without sequence parallelism every tensor rank sees the same values
        if tp_rank != 0 or ps.get_data_parallel_rank(with_context_parallel=True) != 0:
            gains.zero_()  # norm gains: replicated over tensor, context, data parallel ranks
        owned = torch.zeros(self.num_entries, dtype=torch.float64, device=self.device)
        for entry in set(self._entry_of.values()):
            owned[entry] = 1.0  # entries with parameters somewhere (none: Post-LN's output)
        flat = torch.cat([sums.flatten(), gains.flatten(), self._fp8_counts.flatten(),
                          self._grad_sq, owned])
        maxima = self._max.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        n_sums, n_gains = sums.numel(), gains.numel()
        sums = flat[:n_sums].view_as(sums).tolist()
        gains = flat[n_sums:n_sums + n_gains].view_as(gains).tolist()
        n_fp8 = self._fp8_counts.numel()
        fp8 = flat[n_sums + n_gains:n_sums + n_gains + n_fp8].view_as(self._fp8_counts).tolist()
        rest = flat[n_sums + n_gains + n_fp8:]
        grad_sq = rest[:self.num_entries].tolist()
        owned = rest[self.num_entries:].tolist()
        maxima = maxima.tolist()
        records = [self._entry_record(e, sums[e], maxima[e], gains[e],
                                      grad_sq[e] if owned[e] > 0 else None)
                   for e in range(self.num_entries)]
        for record, counts in zip(records, fp8):
            if any(elements > 0 for _, _, elements in counts):
                # fractions: a tensor every tensor-parallel rank quantizes whole counts the same
                record["fp8"] = {role: {"saturated": sat / max(n, 1),
                                        "underflowed": under / max(n, 1)}
                                 for role, (sat, under, n) in zip(FP8_ROLES, counts)}
        return records

    def _entry_record(self, entry, sums, maxima, gains, grad_sq) -> dict:
        if entry == 0:
            kind = "embedding"
        elif entry == self.num_entries - 1:
            kind = "output"
        else:
            kind = self.config.layer_placement(entry).value
        record = {"layer": entry, "kind": kind}
        for i, site in enumerate(SITES):
            stats = _moments(sums[i], maxima[i])
            if stats is not None:
                record[site] = stats
        if not self._grads_recorded or grad_sq is None:  # fp16 overflow; no parameters
            record["grad_norm"] = None
        else:
            record["grad_norm"] = grad_sq ** 0.5 if grad_sq >= 0 else float("nan")
        record["norms"] = {}
        for i, name in enumerate(GAIN_NAMES):
            count, total, squares = gains[i]
            if count > 0:
                mean = total / count
                record["norms"][name] = {"mean": mean,
                                         "std": max(squares / count - mean * mean, 0.0) ** 0.5}
        return record


def _moments(row, max_abs) -> Optional[dict]:
    """{"mean", "var", "rms", "max_abs"} from (count, sum, sum of squares), None if empty."""
    count, total, squares = row
    if count <= 0:
        return None
    mean = total / count
    return {"mean": mean, "var": max(squares / count - mean * mean, 0.0),
            "rms": max(squares / count, 0.0) ** 0.5, "max_abs": max_abs}
