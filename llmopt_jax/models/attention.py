"""Grouped-query self-attention: causal or bidirectional, RoPE or not, with optional biases.

One module serves every family: Llama (RoPE, no biases, or q/k/v biases for Qwen2), GPT-2
and BERT (biases on all four projections, positions added to the embeddings instead).

Axis letters used in the einsums and shape comments:
  B batch   T length (queries)   S length (keys)   D embed
  N query heads   K key/value heads   G groups = N // K   H head dim
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax import sharding
from llmopt_jax.models import dropout
from llmopt_jax.models import families
from llmopt_jax.models import kv_cache
from llmopt_jax.models import layers
from llmopt_jax.models.config import TransformerConfig


def attention_mask(length: int, segment_ids: jax.Array | None = None, *, causal: bool = True,
                   padding_mask: jax.Array | None = None, sliding_window: int = 0) -> jax.Array:
  """Which keys each query may see, as a boolean mask [B or 1, T, S].

  Causal: earlier-or-same positions only; `sliding_window` w > 0 further limits a query to
  the last w keys (Mistral: key s is visible from query t when t - w < s <= t). Segment ids let
  several documents share one row of a packed batch without attending across document
  boundaries. `padding_mask` [B, S] (1 real, 0 padding) hides padding keys, as the attention
  masks of Hugging Face models do.
  """
  t = jnp.arange(length)
  mask = jnp.ones((1, length, length), dtype=jnp.bool_)
  if causal:
    mask = mask & (t[None, :] <= t[:, None])[None]
  if sliding_window:
    mask = mask & (t[None, :] > t[:, None] - sliding_window)[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, T, S]
  if padding_mask is not None:
    mask = mask & padding_mask.astype(jnp.bool_)[:, None, :]
  return mask


class Attention(nnx.Module):
  """Multi-head attention with `num_kv_heads` shared key/value heads (GQA, Ainslie et al. 2023).

  K = 1 is multi-query attention, K = N is ordinary multi-head attention. Query heads are
  reshaped into K groups of G heads that share one key/value head, so the (smaller) keys and
  values are never repeated in memory; query head n uses key/value head n // G.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    family = families.get(c.family)
    self.num_kv_heads = c.num_kv_heads
    self.rope_theta = c.rope_theta if family.positions == 'rope' else None
    self.rope_scaling = layers.RopeScaling(
        c.rope_scaling_factor, c.rope_low_freq_factor, c.rope_high_freq_factor,
        c.rope_original_max_positions) if c.rope_scaling_factor else None
    self.dtype = jnp.dtype(c.dtype)
    pdtype = jnp.dtype(c.param_dtype)
    init = layers.normal(c.init_std)
    # Residual output projection scaled by 1/sqrt(2 * num_layers) (GPT-2, Radford et al. 2019):
    # each of the 2L residual branches adds variance, this keeps the stream's scale ~constant.
    out_init = layers.normal(c.init_std / math.sqrt(2 * c.num_layers))
    d, n, k, h = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    self.q = layers.param(rngs, init, (d, n, h), pdtype, ('embed', 'heads', 'kv'))
    self.k = layers.param(rngs, init, (d, k, h), pdtype, ('embed', 'kv_heads', 'kv'))
    self.v = layers.param(rngs, init, (d, k, h), pdtype, ('embed', 'kv_heads', 'kv'))
    self.o = layers.param(rngs, out_init, (n, h, d), pdtype, ('heads', 'kv', 'embed'))
    self.dropout = dropout.Dropout(c.attention_dropout_rate)
    bias = functools.partial(layers.Bias, param_dtype=pdtype, rngs=rngs)
    qkv_bias = family.bias or c.attention_bias
    self.q_bias = bias((n, h), ('heads', 'kv')) if qkv_bias else None
    self.k_bias = bias((k, h), ('kv_heads', 'kv')) if qkv_bias else None
    self.v_bias = bias((k, h), ('kv_heads', 'kv')) if qkv_bias else None
    self.o_bias = bias((d,), ('embed',)) if family.bias else None
    # Qwen3's q/k norms: over each head's H features, one gain [H] shared by all heads.
    norm = functools.partial(layers.RMSNorm, h, eps=c.norm_eps, dtype=self.dtype,
                             param_dtype=pdtype, rngs=rngs, axis='kv')
    self.q_norm = norm() if c.qk_norm else None
    self.k_norm = norm() if c.qk_norm else None

  def project_qkv(self, x: jax.Array, positions: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [B,T,N,H] and keys, values [B,S,K,H]; q/k norms (Qwen3) and then RoPE on
    queries and keys where the config has them."""
    x = x.astype(self.dtype)
    q = layers.contract('BTD,DNH->BTNH', x, self.q, self.dtype)
    k = layers.contract('BSD,DKH->BSKH', x, self.k, self.dtype)
    v = layers.contract('BSD,DKH->BSKH', x, self.v, self.dtype)
    q = layers.maybe_bias(q, self.q_bias)
    k = layers.maybe_bias(k, self.k_bias)
    v = layers.maybe_bias(v, self.v_bias)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rope_theta is not None:
      q = layers.apply_rope(q, positions, self.rope_theta, self.rope_scaling)
      k = layers.apply_rope(k, positions, self.rope_theta, self.rope_scaling)
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'kv'))
    k = sharding.constrain(k, ('batch', 'length', 'kv_heads', 'kv'))
    v = sharding.constrain(v, ('batch', 'length', 'kv_heads', 'kv'))
    return q, k, v

  def probabilities(self, q: jax.Array, k: jax.Array, mask: jax.Array,
                    keys: str = 'BSKH') -> jax.Array:
    """Attention weights [B,K,G,T,S] in float32 (a softmax over S, the keys); `keys` names
    the layout of `k` ('BSKH' as projected, 'BKSH' as a KV cache stores it).

    Scores and softmax run in float32: bfloat16 logits of a few hundred keys round enough to
    change which key wins. The mask uses the dtype's most negative finite value, not -inf, so
    a fully masked row (a padding query under left padding) gets uniform weights, not NaNs.
    """
    b, t, n, h = q.shape
    q = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)  # [B, T, K, G, H]
    scores = jnp.einsum(f'BTKGH,{keys}->BKGTS', q, k, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) / math.sqrt(h)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)

  def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """Self-attention of `x` [B,T,D] under `mask` [B or 1,T,S]; dropout only when given rngs.

    Returns the output [B,T,D] and the attention weights [B,N,T,S] (float32, before dropout)
    for techniques that read them (attention transfer); unused, they cost nothing under jit.
    """
    q, k, v = self.project_qkv(x, positions)
    probs = self.probabilities(q, k, mask)  # [B, K, G, T, S]
    dropped = self.dropout(probs, deterministic=rngs is None, rngs=rngs)
    b, k_heads, g, t, _ = probs.shape
    return self.combine(dropped, v), probs.reshape(b, k_heads * g, t, -1)

  def combine(self, probs: jax.Array, v: jax.Array, values: str = 'BSKH') -> jax.Array:
    """The output [B,T,D]: values `v` (layout `values`, as in `probabilities`) averaged by
    `probs` [B,K,G,T,S], heads merged."""
    out = jnp.einsum(f'BKGTS,{values}->BTKGH', probs.astype(self.dtype), v)
    b, t, k_heads, g, h = out.shape
    out = out.reshape(b, t, k_heads * g, h)  # [B, T, N, H], query head n = k * G + g
    out = layers.contract('BTNH,NHD->BTD', out, self.o, self.dtype)
    return layers.maybe_bias(out, self.o_bias)

  def cached(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array, cursor: jax.Array,
             keys: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of T new tokens `x` [B,T,D] over a layer's cache (`models.kv_cache`).

    Their keys and values are written into `keys`, `values` [B,K,S,H] at slots `cursor` [B]
    onwards, then the queries attend to the slots `mask` [B,T,S] allows. Returns the output
    [B,T,D] and the updated buffers. Deterministic: generation runs no dropout.
    """
    q, k, v = self.project_qkv(x, positions)
    keys = kv_cache.write(keys, k, cursor)
    values = kv_cache.write(values, v, cursor)
    probs = self.probabilities(q, keys, mask, keys=kv_cache.LAYOUT)
    return self.combine(probs, values, values=kv_cache.LAYOUT), keys, values
