"""Closed-form size and cost of a `TransformerConfig`: parameters, bytes and FLOPs per token.

These let a config be planned (does llama_7b fit? how many tokens per second is 50% MFU?)
without building the model; tests check `count_params` against a real model's state.
"""

from __future__ import annotations

import jax.numpy as jnp

from llmopt_jax.models import families
from llmopt_jax.models.config import TransformerConfig


def _layer_matmul_params(c: TransformerConfig) -> int:
  """Weights of one block's matrices: q, k, v, o and the MLP's (gate,) up and down."""
  attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = (3 if families.get(c.family).gated_mlp else 2) * c.embed_dim * c.mlp_dim
  return attn + mlp


def _layer_bias_params(c: TransformerConfig) -> int:
  """Biases of one block: q, k, v (Qwen2, GPT-2, BERT), o, and the MLP's up and down."""
  family = families.get(c.family)
  qkv = c.head_dim * (c.num_heads + 2 * c.num_kv_heads)
  return (qkv if family.bias or c.attention_bias else 0) + (
      c.embed_dim + c.mlp_dim + c.embed_dim if family.bias else 0)


def _output_params(c: TransformerConfig) -> int:
  """Weights of the projection to the vocabulary, the embedding table's when tied."""
  return c.embed_dim * c.vocab_size if c.lm_head else 0


def count_params(config: TransformerConfig) -> int:
  """Number of parameters of `Transformer(config)`."""
  c = config
  family = families.get(c.family)
  tables = (c.vocab_size + c.max_positions + c.type_vocab_size) * c.embed_dim
  lm_head = _output_params(c) if not c.tie_embeddings else 0
  # Two per block and one more: the final norm (pre-norm) or the embedding norm (post-norm).
  norms = (2 * c.num_layers + 1) * c.embed_dim * (2 if family.norm == 'layer' else 1)
  norms += c.num_layers * 2 * c.head_dim if c.qk_norm else 0  # Qwen3's q and k norms
  layers = c.num_layers * (_layer_matmul_params(c) + _layer_bias_params(c))
  return tables + lm_head + layers + norms


def param_bytes(config: TransformerConfig) -> int:
  """Bytes to store the parameters in `param_dtype` (no optimizer state, no activations)."""
  return count_params(config) * jnp.dtype(config.param_dtype).itemsize


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token at sequence length `seq_len`.

  Follows PaLM (Chowdhery et al. 2022, appendix B), as in Chinchilla: 6 FLOPs per matmul
  weight per token (2 forward, 4 backward) plus 12 * L * T * N * H for the attention scores
  q.k and the weighted sum of values. The embedding lookups are gathers and cost nothing; the
  output projection to the vocabulary is a matmul and is counted, tied or not (an encoder
  without one skips it). Biases and norms are negligible and not counted. Like PaLM we
  count the full T x T score matrix, not the causal half a fused kernel could skip, so the
  resulting MFU is comparable with published figures.
  """
  c = config
  matmul_params = c.num_layers * _layer_matmul_params(c) + _output_params(c)
  attention = 12 * c.num_layers * seq_len * c.num_heads * c.head_dim
  return float(6 * matmul_params + attention)


def forward_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Forward-only FLOPs per token (inference, teacher outputs): a third of training."""
  return flops_per_token(config, seq_len) / 3

