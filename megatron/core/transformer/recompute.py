"""Activation recomputation helpers. ``checkpoint_function``: which checkpoint a model uses.

Selective recomputation of tensors that a layer would keep for backward only because the
next operation saves them, and that are cheap to make again from a tensor kept anyway.

``layernorm``: a norm's output is saved by the projection it feeds (for the weight
gradient), while the norm already keeps its own input: the output is saved as "the norm of
that input" and recomputed when backward reaches the projection. ``output_norm``: Peri-LN's
output norm keeps its input, the sublayer's output projection's result, while the projection
already keeps its own input: saved as "the projection of that input" (one GEMM again, with
its tensor-parallel reduction). Megatron-LM does the first by freeing and refilling the
tensor's storage; here autograd's saved-tensor hooks swap it for a recipe.

    outputs = RecomputedOutputs()
    norm.register_forward_hook(outputs.mark_hook)     # output -> recompute from the input
    with outputs.saving():                            # during the layer's forward
        y = layer(x)
"""

import contextlib

import torch

from megatron.core.tensor_parallel import checkpoint as tp_checkpoint


def checkpoint_function(config):
    """The activation checkpointing a model built from ``config`` uses: TransformerEngine's
    with its layers; else ours, which under torch.compile stays eager (a graph break: the
    compiler cannot trace its restoring of the random states)."""
    if config.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import checkpoint
        return checkpoint
    return torch.compiler.disable(tp_checkpoint) if config.torch_compile else tp_checkpoint


def _key(t: torch.Tensor):
    """What identifies the memory of ``t``: a saved tensor is often a view of a marked output
    (a linear layer saves its 3-D input flattened to 2-D), so its storage, not its shape."""
    try:
        return t.untyped_storage().data_ptr(), t.dtype, t.device
    except (RuntimeError, NotImplementedError):  # tensors without plain storage
        return None


class _Recompute:
    """How to make a saved tensor again: ``module(*inputs)``, viewed as it was saved."""
    __slots__ = ("module", "inputs", "shape", "stride", "offset")

    def __init__(self, module, inputs, saved: torch.Tensor, output: torch.Tensor):
        self.module, self.inputs = module, inputs
        self.shape, self.stride = tuple(saved.shape), tuple(saved.stride())
        self.offset = saved.storage_offset() - output.storage_offset()

    def __call__(self) -> torch.Tensor:
        fresh = self.module(*self.inputs)
        return fresh.as_strided(self.shape, self.stride, fresh.storage_offset() + self.offset)


class RecomputedOutputs:
    """Marked module outputs, saved for backward as (module, its inputs) instead of as
    tensors while ``saving()`` is active."""

    def __init__(self):
        self._marked = {}

    def mark_hook(self, module, inputs, output) -> None:
        """A forward hook: ``output`` can be recomputed as ``module(*inputs)``."""
        if self._active and torch.is_grad_enabled() and isinstance(output, torch.Tensor) and \
                output.is_contiguous():  # made again with the same layout
            key = _key(output)
            if key is not None:  # kept alive until saving() ends, so the key stays unique
                self._marked[key] = (output, module, inputs)

    _active = False

    @contextlib.contextmanager
    def saving(self):
        self._active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._active = False
            self._marked.clear()

    def _pack(self, t: torch.Tensor):
        entry = self._marked.get(_key(t)) if self._marked else None
        if entry is None:
            return t
        output, module, inputs = entry
        return _Recompute(module, inputs, t, output)

    @staticmethod
    def _unpack(packed):
        if not isinstance(packed, _Recompute):
            return packed
        with torch.no_grad():
            return packed()
