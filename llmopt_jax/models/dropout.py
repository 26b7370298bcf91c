"""Dropout that draws 16 random bits per decision instead of 32.

A dropout mask needs one keep/drop decision per element, and `jax.random.bernoulli` spends a
32-bit word, one threefry hash, on each. On CPU those hashes are 3 to 6% of a train step
(experiments/results/profile_step_*.md). Here each 32-bit word is cut into two 16-bit
halves, each a uniform integer in [0, 65536) independent of the other, and an element is kept
when its half is below round(keep * 65536): half the hashes for the same mask statistics.
The keep probability is that threshold / 65536, within 2^-17 of 1 - rate (0.9 becomes
0.899994), and the kept values are divided by it, so the layer is exactly unbiased.

Element 2j and 2j + 1 of the last axis take the halves of word j. A shard of the last axis
(or of any other) therefore reads only words of its own slice, and with JAX's partitionable
threefry, whose bits depend on an element's global index alone, the mask is the same however
the array is sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_HALF_WORD = 1 << 16


def keep_threshold(rate: float) -> int:
  """The 16-bit threshold below which an element is kept: round((1 - rate) * 2^16)."""
  return round((1.0 - rate) * _HALF_WORD)


def keep_probability(rate: float) -> float:
  """The probability that `keep_mask` keeps an element: keep_threshold / 2^16."""
  return keep_threshold(rate) / _HALF_WORD


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """A boolean mask of `shape`, each element True with probability `keep_probability`."""
  *lead, last = shape
  words = jax.random.bits(key, (*lead, -(-last // 2)), jnp.uint32)
  halves = jnp.stack([words & (_HALF_WORD - 1), words >> 16], axis=-1)
  halves = halves.reshape(*lead, -1)[..., :last]
  return halves < jnp.uint32(keep_threshold(rate))


class Dropout(nnx.Module):
  """Inverted dropout at `rate` (the `keep_mask` above): identity when deterministic; else
  each element zeroed or divided by its keep probability. Its key comes from the `dropout`
  stream of the `rngs` given to the call; the module holds no RNG state."""

  def __init__(self, rate: float):
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f'dropout rate must lie in [0, 1], got {rate!r}')
    self.rate = rate

  def __call__(self, x: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if rngs is None:
      raise ValueError('Dropout: deterministic=False needs rngs with a dropout stream')
    p = keep_probability(self.rate)
    if p == 0.0:
      return jnp.zeros_like(x)
    with jax.named_scope('dropout'):  # so profiles can tell its ops from the layer's
      keep = keep_mask(rngs.dropout(), x.shape, self.rate)
      # Scaled in float32: 1 / 0.9 rounded to bfloat16 would bias every kept value by 0.2%.
      scaled = (x.astype(jnp.float32) * (1.0 / p)).astype(x.dtype)
      return jnp.where(keep, scaled, jnp.zeros((), x.dtype))
