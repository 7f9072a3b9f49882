"""Megatron-style GPT training with a choice of normalization placement (Pre/Post/Mix/Peri-LN)."""

__version__ = "0.1.0"
