"""GPTModel: embedding (+ optional norm), this stage's layers, final norm, output layer, loss.

Activations flow [sequence, batch, hidden] between modules, as in Megatron-LM; inputs and
outputs at the model's boundary are [batch, sequence].
"""

from typing import Optional, Sequence

import torch
from torch import nn

from megatron.core import ConfigError, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.extensions.transformer_engine import fp8_model_init
from megatron.core.inference.kv_cache import InferenceContext
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    get_rng_tracker,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer import (
    TransformerBlock,
    TransformerConfig,
    build_norm,
    context_parallel,
)
from megatron.core.transformer.dropout import dropout
from megatron.core.transformer.rope import RotaryEmbedding


class LanguageModelEmbedding(nn.Module):
    """word_embeddings (+ position_embeddings) -> [embedding_norm] -> dropout, as [s, b, h]."""

    def __init__(self, config: TransformerConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.word_embeddings = VocabParallelEmbedding(vocab_size, config.hidden_size,
                                                      init_method=config.init_method,
                                                      params_dtype=config.params_dtype)
        self.add_position_embedding = config.position_embedding_type == "learned_absolute"
        if self.add_position_embedding:
            self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                    config.hidden_size, dtype=config.params_dtype)
            config.init_method(self.position_embeddings.weight.data)
        self.embedding_norm = build_norm(config) if config.embedding_norm else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        sp = self.config.sequence_parallel and self.config.tensor_model_parallel_size > 1
        # Without position embeddings the partial vocabulary lookups can be reduce-scattered
        # straight to sequence shards; otherwise all-reduce, add positions, then split.
        reduce_scatter = sp and not self.add_position_embedding
        x = self.word_embeddings(input_ids, reduce=not reduce_scatter)
        if self.add_position_embedding:
            x = x + self.position_embeddings(position_ids)
        x = x.transpose(0, 1).contiguous()
        if reduce_scatter:
            x = tensor_parallel.reduce_scatter_to_sequence_parallel_region(x)
        elif sp:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        if not self.training or self.config.hidden_dropout == 0.0:
            return x
        if sp:
            with get_rng_tracker().fork():
                return dropout(x, self.config.hidden_dropout, True)
        return dropout(x, self.config.hidden_dropout, True)


class GPTModel(nn.Module):
    """A decoder-only language model, or one pipeline stage of it.

    Args:
        config: the transformer config.
        vocab_size: the padded vocabulary size (a multiple of 128 x tensor-parallel size).
        pre_process: this stage holds the embedding.
        post_process: this stage holds the final norm, the output layer and the loss.
        layer_numbers: global 1-based numbers of the layers on this stage (all by default).
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, pre_process: bool = True,
                 post_process: bool = True, layer_numbers: Optional[Sequence[int]] = None):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.input_tensor = None
        if pre_process:
            with config.init_rng(0):
                self.embedding = LanguageModelEmbedding(config, vocab_size)
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, config.rotary_percent,
                                              config.rotary_base) \
            if config.position_embedding_type == "rope" else None
        with fp8_model_init(config):  # weights held in FP8 under --fp8-param-gather (TE)
            self.decoder = TransformerBlock(config, layer_numbers, post_process)
        if post_process:
            tied_elsewhere = not pre_process and self.share_embeddings_and_output_weights
            with config.init_rng(config.num_layers + 1):
                self.output_layer = ColumnParallelLinear(
                    config.hidden_size, vocab_size, bias=False,
                    init_method=torch.nn.init.zeros_ if tied_elsewhere else config.init_method,
                    sequence_parallel=config.sequence_parallel,
                    params_dtype=config.params_dtype,
                    skip_weight_param_allocation=pre_process and
                    self.share_embeddings_and_output_weights)
            if tied_elsewhere:
                # The last stage's copy of the tied embedding: zeros here, made equal to the
                # first stage's table by an all-reduce over the embedding group before
                # training, and kept equal by all-reducing both copies' gradients.
                self.output_layer.weight.shared_embedding = True

    def shared_embedding_weight(self) -> Optional[torch.Tensor]:
        """This stage's copy of a tied embedding table that another stage also holds."""
        if not self.share_embeddings_and_output_weights or self.pre_process == self.post_process:
            return None
        return self.embedding.word_embeddings.weight if self.pre_process \
            else self.output_layer.weight

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """The previous pipeline stage's output, used by the next forward of this stage."""
        self.input_tensor = tensor

    def output_weight(self) -> Optional[torch.Tensor]:
        """The tied embedding table when this stage holds it, else the output layer's own."""
        if self.pre_process and self.share_embeddings_and_output_weights:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                decoder_input: Optional[torch.Tensor] = None,
                inference_context: Optional[InferenceContext] = None) -> torch.Tensor:
        """Per-token loss [b, s] when ``labels`` is given, else logits [b, s, vocab / tp].

        ``attention_mask``: None for plain causal attention, Megatron's boolean [b, 1, s, s]
        mask (True = masked), or document ids [b, s] (integers: causal attention within each
        document). With context parallelism the s tokens are this rank's part of each sequence
        (context_parallel.split_batch) and a mask must be document ids over the whole
        sequence. ``decoder_input``: the previous stage's output
        [s, b, h] on a stage without the embedding. ``inference_context``: the key/value
        cache of generation; the s tokens are then positions offset .. offset + s - 1 after
        its ``sequence_len_offset`` cached ones (RoPE rotates by those positions; learned
        positions come from ``position_ids`` as always), and the caller advances the offset.
        """
        if inference_context is not None and self.config.sequence_parallel and \
                self.config.tensor_model_parallel_size > 1:
            raise ConfigError("sequence_parallel=True does not support inference with a "
                              "key/value cache; build the model with sequence_parallel=False "
                              "to generate.")
        cp = self.config.context_parallel_size
        if cp > 1:
            if cp != ps.get_context_parallel_world_size():
                raise ConfigError(
                    f"context_parallel_size={cp} but this rank's context-parallel group has "
                    f"{ps.get_context_parallel_world_size()} ranks; call "
                    "initialize_model_parallel(context_parallel_size=...) with that size.")
            if inference_context is not None:
                raise ConfigError("context_parallel_size > 1 does not support inference with "
                                  "a key/value cache; build the model with "
                                  "context_parallel_size=1 to generate.")
            if attention_mask is not None and not context_parallel.is_document_ids(
                    attention_mask):
                raise ConfigError(context_parallel.DENSE_MASK_ERROR)
        elif context_parallel.is_document_ids(attention_mask):
            attention_mask = context_parallel.document_attention_mask(attention_mask)
        if self.pre_process:
            x = self.embedding(input_ids, position_ids)
        else:
            x = decoder_input if decoder_input is not None else self.input_tensor
        rope = None
        if self.rotary_pos_emb is not None:
            seq_len = x.shape[0] * cp  # the whole sequence's
            if self.config.sequence_parallel:
                seq_len *= self.config.tensor_model_parallel_size
            if inference_context is None and self.config.rope_from_position_ids:
                rope = self.rotary_pos_emb.at(position_ids, seq_len)
            elif inference_context is None:
                rope = self.rotary_pos_emb(seq_len)
                if cp > 1:  # this rank's tokens' global positions
                    index = context_parallel.local_positions(
                        seq_len, cp, ps.get_context_parallel_rank(), rope[0].device)
                    rope = tuple(r.index_select(0, index) for r in rope)
            else:
                offset = inference_context.sequence_len_offset
                rope = tuple(r[offset:] for r in self.rotary_pos_emb(offset + seq_len))
        x = self.decoder(x, attention_mask, rope, inference_context=inference_context)
        if not self.post_process:
            return x
        if labels is None:
            logits = self.output_layer(x, weight=self.output_weight())
            return logits.transpose(0, 1).contiguous()
        # the output layer and loss stay eager under --torch-compile: a matrix multiply and
        # the in-place loss, which the compiler's cross entropy is slower than
        logits = self.output_layer(x, weight=self.output_weight())
        return vocab_parallel_cross_entropy(logits, labels.transpose(0, 1),
                                            reuse_logits=True).transpose(0, 1)
