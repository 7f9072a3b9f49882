"""Text generation: the key/value cache the model reads during inference, and the sampling
loop (batched prompts, tensor parallelism)."""

from megatron.core.inference.kv_cache import InferenceContext
from megatron.core.inference.text_generation import generate, sample
