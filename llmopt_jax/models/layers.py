"""Building blocks of the decoder: parameters with logical axes, RMSNorm, RoPE, SwiGLU MLP.

Axis letters used in the einsums and shape comments:
  B batch   T length (queries)   S length (keys)   D embed   F mlp hidden
  N query heads   K key/value heads   G groups = N // K   H head dim   V vocab
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax import sharding

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(
    rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], dtype: jnp.dtype,
    axes: Sequence[str]) -> nnx.Param:
  """A parameter annotated with logical axes.

  Eager sharding is off: the trainer creates the model under `nnx.eval_shape`, derives the
  shardings from these names (`sharding.tree_shardings`) and then initialises it born sharded.
  """
  assert len(axes) == len(shape), (axes, shape)
  return nnx.Param(
      init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def normal(std: float) -> Initializer:
  return jax.nn.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (Zhang & Sennrich 2019): no mean subtraction, no bias.

  The statistics are computed in float32 whatever the compute dtype, because a bfloat16 mean of
  squares over thousands of features loses most of its precision.
  """

  def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), param_dtype, ('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021, RoFormer) of `x` [B, T, heads, H].

  Feature pairs (i, i + H/2) are rotated by the angle position * theta^(-2i/H). The rotation
  of q at position m and k at position n makes q.k depend only on m - n. We pair the two
  halves of the head (the GPT-NeoX / Hugging Face Llama layout) rather than adjacent features,
  so Hugging Face Llama checkpoints load without permuting their q/k weights.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2], broadcast over heads
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Mlp(nnx.Module):
  """SwiGLU feed-forward (Shazeer 2020): down(silu(x gate) * (x up)).

  The gated unit beats a GELU MLP of equal parameter count, which is why Llama uses it with a
  hidden width of about 8/3 of the model width instead of 4x.
  """

  def __init__(self, embed_dim: int, mlp_dim: int, *, init_std: float, out_std: float,
               dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.gate = param(rngs, normal(init_std), (embed_dim, mlp_dim), param_dtype, ('embed', 'mlp'))
    self.up = param(rngs, normal(init_std), (embed_dim, mlp_dim), param_dtype, ('embed', 'mlp'))
    self.down = param(rngs, normal(out_std), (mlp_dim, embed_dim), param_dtype, ('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    gate = jnp.einsum('BTD,DF->BTF', x, self.gate[...].astype(self.dtype))
    up = jnp.einsum('BTD,DF->BTF', x, self.up[...].astype(self.dtype))
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return jnp.einsum('BTF,FD->BTD', hidden, self.down[...].astype(self.dtype))
