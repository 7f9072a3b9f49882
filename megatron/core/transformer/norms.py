"""The one norm builder: every norm in the model is made here."""

from torch import nn

from megatron.core.transformer.config import TransformerConfig


def build_norm(config: TransformerConfig) -> nn.Module:
    """A LayerNorm or RMSNorm over the hidden size, with its own learnable gain.

    Under sequence parallelism the norm sees only this rank's slice of the sequence, so its
    parameters are marked ``sequence_parallel`` and their gradients are all-reduced across the
    tensor-parallel group before the optimizer step.
    """
    cls = nn.LayerNorm if config.normalization == "LayerNorm" else nn.RMSNorm
    norm = cls(config.hidden_size, eps=config.norm_epsilon, dtype=config.params_dtype)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm))

