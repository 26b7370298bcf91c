"""A Llama-style decoder-only transformer in Flax NNX.

Pre-norm residual blocks, x + attn(norm(x)) then x + mlp(norm(x)), with RMSNorm, rotary
positions, grouped-query attention and a SwiGLU MLP; a final norm and logits through the tied
embedding table or a separate output matrix (Touvron et al. 2023, Llama).

Axis letters used in the einsums and shape comments:
  B batch   T length   D embed   V vocab

Usage:
  model = Transformer(get_preset('tiny'), rngs=nnx.Rngs(0))
  logits = model(tokens)                            # deterministic (evaluation)
  logits = model(tokens, rngs=nnx.Rngs(dropout=k))  # with dropout (training)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax import sharding
from llmopt_jax.models import attention
from llmopt_jax.models import layers
from llmopt_jax.models.config import TransformerConfig

_RESIDUAL = ('batch', 'length', 'embed')


class Block(nnx.Module):
  """One pre-norm decoder layer: attention, then MLP, each added to the residual stream."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.attn_norm = layers.RMSNorm(
        c.embed_dim, eps=c.norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
    self.attn = attention.Attention(c, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(
        c.embed_dim, eps=c.norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
    # `down` is a residual output projection: scaled like attention's `o` (see Attention).
    self.mlp = layers.Mlp(
        c.embed_dim, c.mlp_dim, init_std=c.init_std,
        out_std=c.init_std / math.sqrt(2 * c.num_layers), dtype=dtype, param_dtype=pdtype,
        rngs=rngs)
    self.dropout = nnx.Dropout(c.dropout_rate)

  def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """The residual stream [B,T,D] after this layer; dropout only when `rngs` is given."""
    deterministic = rngs is None
    h = self.attn(self.attn_norm(x), positions=positions, mask=mask, rngs=rngs)
    x = x + self.dropout(h, deterministic=deterministic, rngs=rngs)
    h = self.mlp(self.mlp_norm(x))
    x = x + self.dropout(h, deterministic=deterministic, rngs=rngs)
    return sharding.constrain(x, _RESIDUAL)


class Transformer(nnx.Module):
  """Decoder LM: tokens [B,T] -> next-token logits [B,T,V] in float32.

  The forward pass is split into `embed`, the `blocks` and `unembed` so that techniques that
  need intermediate activations (hidden-state distillation, probing) can run the same pieces
  and read what they need between them.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.dtype = jnp.dtype(c.dtype)
    pdtype = jnp.dtype(c.param_dtype)
    init = layers.normal(c.init_std)
    self.embedding = layers.param(
        rngs, init, (c.vocab_size, c.embed_dim), pdtype, ('vocab', 'embed'))
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = layers.RMSNorm(
        c.embed_dim, eps=c.norm_eps, dtype=self.dtype, param_dtype=pdtype, rngs=rngs)
    # Named `lm_head`, not `*embedding`, so name-based rules (weight decay) treat it as the
    # ordinary matrix it is.
    self.lm_head = None if c.tie_embeddings else layers.param(
        rngs, init, (c.embed_dim, c.vocab_size), pdtype, ('embed', 'vocab'))

  def embed(self, tokens: jax.Array) -> jax.Array:
    """The residual stream [B,T,D] at the input: a lookup in the embedding table."""
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    return sharding.constrain(x, _RESIDUAL)

  def unembed(self, x: jax.Array) -> jax.Array:
    """Logits [B,T,V] from the last residual stream, accumulated and returned in float32."""
    x = self.final_norm(x)
    if self.lm_head is None:
      logits = jnp.einsum('BTD,VD->BTV', x, self.embedding[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum('BTD,DV->BTV', x, self.lm_head[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    return sharding.constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B,T,V] float32 for `tokens` [B,T].

    Args:
      tokens: int token ids [B,T].
      positions: RoPE positions [B,T] (or [T]); default 0..T-1. Packed batches pass the
        position within each document.
      segment_ids: [B,T] ids; a token attends only to earlier tokens with the same id.
      rngs: None for a deterministic pass (evaluation); otherwise dropout keys come from
        `rngs.dropout()`. The module stores no RNG state, so `nnx.split(model, nnx.Param)`
        holds everything.
    """
    b, t = tokens.shape
    positions = jnp.arange(t) if positions is None else positions
    positions = jnp.broadcast_to(positions, (b, t))
    mask = attention.attention_mask(t, segment_ids)
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, positions=positions, mask=mask, rngs=rngs)
    return self.unembed(x)
