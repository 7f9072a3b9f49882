"""torch.compile for parts of the model (``TransformerConfig.torch_compile``), with one
warning and the eager functions if compiling fails."""

import warnings
from typing import Callable, Sequence

import torch


class CompiledFunctions:
    """``functions[i]`` through torch.compile, called as ``self(i, *args)``. The compiled
    forms are kept outside the module tree, so parameter and state-dict names do not change.
    On the first failure to compile (no C compiler, an unsupported operation), one warning
    naming the reason, and every function runs eagerly from then on."""

    def __init__(self, functions: Sequence[Callable], what: str):
        self.functions, self.what = list(functions), what
        self.compiled = [torch.compile(f) for f in self.functions]

    def __call__(self, i: int, *args, **kwargs):
        if self.compiled is not None:
            import torch._dynamo.exc  # loaded with torch.compile; imported for the name
            try:
                return self.compiled[i](*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:  # what compiling raises
                self.compiled = None
                reason = str(e).splitlines()[0] if str(e) else ""
                warnings.warn(f"torch.compile could not compile {self.what} "
                              f"({type(e).__name__}: {reason}); running them eagerly.",
                              stacklevel=2)
        return self.functions[i](*args, **kwargs)
