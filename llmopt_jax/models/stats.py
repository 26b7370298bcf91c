"""Closed-form size and cost of a `TransformerConfig`: parameters, bytes and FLOPs per token.

These let a config be planned (does llama_7b fit? how many tokens per second is 50% MFU?)
without building the model; tests check `count_params` against a real model's state.
"""

from __future__ import annotations

import jax.numpy as jnp

from llmopt_jax.models.config import TransformerConfig


def _layer_matmul_params(c: TransformerConfig) -> int:
  """Weights of one block's matrices: q, k, v, o and the SwiGLU gate, up and down."""
  attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.embed_dim * c.mlp_dim
  return attn + mlp


def count_params(config: TransformerConfig) -> int:
  """Number of parameters of `Transformer(config)`."""
  c = config
  embedding = c.vocab_size * c.embed_dim
  lm_head = 0 if c.tie_embeddings else c.embed_dim * c.vocab_size
  norms = (2 * c.num_layers + 1) * c.embed_dim  # two per block and the final one
  return embedding + lm_head + c.num_layers * _layer_matmul_params(c) + norms


def param_bytes(config: TransformerConfig) -> int:
  """Bytes to store the parameters in `param_dtype` (no optimizer state, no activations)."""
  return count_params(config) * jnp.dtype(config.param_dtype).itemsize


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token at sequence length `seq_len`.

  Follows PaLM (Chowdhery et al. 2022, appendix B), as in Chinchilla: 6 FLOPs per matmul
  weight per token (2 forward, 4 backward) plus 12 * L * T * N * H for the attention scores
  q.k and the weighted sum of values. The embedding lookup is a gather and costs nothing; the
  output projection to the vocabulary is a matmul and is counted, tied or not. Like PaLM we
  count the full T x T score matrix, not the causal half a fused kernel could skip, so the
  resulting MFU is comparable with published figures.
  """
  c = config
  matmul_params = c.num_layers * _layer_matmul_params(c) + c.embed_dim * c.vocab_size
  attention = 12 * c.num_layers * seq_len * c.num_heads * c.head_dim
  return float(6 * matmul_params + attention)


def forward_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Forward-only FLOPs per token (inference, teacher outputs): a third of training."""
  return flops_per_token(config, seq_len) / 3

