"""Building blocks: parameters with logical axes, norms, embeddings, RoPE, dense layers, MLPs.

Every bias parameter is called `bias` and every norm gain `scale` (the last entry of its path),
because weight decay is masked by those names (optim.decay_mask); a bias of a projection that
is stored as a bare matrix therefore lives in a small `Bias` submodule (`attn/q_bias/bias`).

Axis letters used in the einsums and shape comments:
  B batch   T length (queries)   S length (keys)   D embed   F mlp hidden
  N query heads   K key/value heads   G groups = N // K   H head dim   V vocab
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax import sharding
from llmopt_jax.models import matmul

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


# HF's `silu`, `gelu_new` (GPT-2: the tanh approximation) and `gelu` (BERT: exact, with erf).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': jax.nn.silu,
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
}


class Bias(nnx.Module):
  """A zero-initialised bias, added to a projection stored as a bare matrix."""

  def __init__(self, shape: Sequence[int], axes: Sequence[str | None], *,
               param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.bias = param(rngs, jax.nn.initializers.zeros, shape, param_dtype, axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.bias[...].astype(x.dtype)


def maybe_bias(x: jax.Array, bias: Bias | None) -> jax.Array:
  return x if bias is None else bias(x)


def contract(spec: str, x: jax.Array, kernel: nnx.Variable, dtype: jnp.dtype,
             **einsum_kwargs) -> jax.Array:
  """`einsum(spec, x, kernel)` in `dtype`, for every weight matrix of every model.

  A kernel holding a plain array is cast and contracted here, as the 2-D matmul the spec
  is (`models.matmul`: its backward pass avoids XLA:CPU's transposed copies; a two-axis
  contraction such as attention's [N,H,D] output projection is reshaped into one axis, which
  also stops XLA copying the kernel into a transposed layout on every decode step). Any other
  value (a quantized kernel, `quant.kernels`) contracts itself, so a parameter tree with
  integer weights in place of float ones runs the same model classes.
  """
  w = kernel.get_value()
  if isinstance(w, jax.Array):
    return matmul.einsum(spec, x.astype(dtype), w.astype(dtype), **einsum_kwargs)
  return w.einsum(spec, x, dtype)


def lookup(table: nnx.Variable, ids: jax.Array, dtype: jnp.dtype | None = None) -> jax.Array:
  """Rows `ids` of an embedding table (plain or quantized, as in `contract`)."""
  w = table.get_value()
  if isinstance(w, jax.Array):
    rows = jnp.take(w, ids, axis=0)
    return rows if dtype is None else rows.astype(dtype)
  return w.take(ids, jnp.float32 if dtype is None else dtype)


class Dense(nnx.Module):
  """x @ kernel + bias for the small heads (pooler, classifier): kernel [in, out]."""

  def __init__(self, in_dim: int, out_dim: int, axes: tuple[str | None, str | None], *,
               init_std: float, use_bias: bool, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(rngs, normal(init_std), (in_dim, out_dim), param_dtype, axes)
    self.bias = param(
        rngs, jax.nn.initializers.zeros, (out_dim,), param_dtype, axes[1:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = contract('...I,IO->...O', x, self.kernel, self.dtype)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Embed(nnx.Module):
  """A lookup table named `embedding` (position and token-type tables of GPT-2 and BERT).

  The table's rows are not a logical axis of the model (positions and segment types are few),
  so only the feature axis is split.
  """

  def __init__(self, num: int, dim: int, *, init_std: float, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.embedding = param(rngs, normal(init_std), (num, dim), param_dtype, (None, 'embed'))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return lookup(self.embedding, ids)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (Zhang & Sennrich 2019): no mean subtraction, no bias.

  The statistics are computed in float32 whatever the compute dtype, because a bfloat16 mean of
  squares over thousands of features loses most of its precision.
  """

  def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs, axis: str = 'embed'):
    self.eps = eps
    self.dtype = dtype
    # `axis`: the logical axis normalised over ('kv' for Qwen3's per-head q/k norms).
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), param_dtype, (axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """Layer normalisation (Ba et al. 2016) with a gain `scale` and a `bias`, as in GPT-2/BERT.

  Mean and variance are taken in float32, for the same reason as in RMSNorm.
  """

  def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), param_dtype, ('embed',))
    self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), param_dtype, ('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.eps)
    y = x32 * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def make_norm(kind: str, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype,
              rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
  """The family's norm: 'rms' or 'layer'."""
  cls = {'rms': RMSNorm, 'layer': LayerNorm}[kind]
  return cls(dim, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1's RoPE frequency scaling (Hugging Face rope_type 'llama3').

  A rotation whose wavelength 2 pi / freq exceeds original_max_positions / low_freq_factor
  never completed a turn within the pretraining context, so its angles beyond that context
  are new to the model: it is slowed `factor` times, putting `factor` times longer contexts on
  angles seen in pretraining. Wavelengths below original_max_positions / high_freq_factor
  (fast rotations, which carry local order) are kept. Those between blend the two, linearly in
  original_max_positions / wavelength. Clipping that blend weight to [0, 1] gives exactly the
  three cases of transformers' `_compute_llama3_parameters`.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_positions: int

  def __call__(self, inv_freq: jax.Array) -> jax.Array:
    wavelength = 2 * math.pi / inv_freq
    keep = (self.original_max_positions / wavelength - self.low_freq_factor) / (
        self.high_freq_factor - self.low_freq_factor)
    keep = jnp.clip(keep, 0.0, 1.0)  # 0: slowed by `factor`, 1: unchanged
    return (1 - keep) * inv_freq / self.factor + keep * inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               scaling: RopeScaling | None = None) -> jax.Array:
  """Rotary position embedding (Su et al. 2021, RoFormer) of `x` [B, T, heads, H].

  Feature pairs (i, i + H/2) are rotated by the angle position * theta^(-2i/H), those
  frequencies first passed through `scaling` when given (Llama 3.1+). The rotation of q at
  position m and k at position n makes q.k depend only on m - n. We pair the two halves of
  the head (the GPT-NeoX / Hugging Face Llama layout) rather than adjacent features, so
  Hugging Face Llama checkpoints load without permuting their q/k weights.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  if scaling is not None:
    inv_freq = scaling(inv_freq)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2], broadcast over heads
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Mlp(nnx.Module):
  """Feed-forward block: SwiGLU down(silu(x gate) * (x up)) or plain down(act(x up)).

  The gated unit (Shazeer 2020) beats a GELU MLP of equal parameter count, which is why Llama
  uses it with a hidden width of about 8/3 of the model width; GPT-2 and BERT use the plain
  form at 4x with biases on both matrices.
  """

  def __init__(self, embed_dim: int, mlp_dim: int, *, init_std: float, out_std: float,
               dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs,
               activation: str = 'silu', gated: bool = True, use_bias: bool = False):
    self.dtype = dtype
    self.activation = activation  # a name: module attributes stay plain, hashable data
    d, f = embed_dim, mlp_dim
    self.gate = (
        param(rngs, normal(init_std), (d, f), param_dtype, ('embed', 'mlp')) if gated else None)
    self.up = param(rngs, normal(init_std), (d, f), param_dtype, ('embed', 'mlp'))
    self.down = param(rngs, normal(out_std), (f, d), param_dtype, ('mlp', 'embed'))
    bias = functools.partial(Bias, param_dtype=param_dtype, rngs=rngs)
    self.up_bias = bias((f,), ('mlp',)) if use_bias else None
    self.down_bias = bias((d,), ('embed',)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    up = contract('BTD,DF->BTF', x, self.up, self.dtype)
    up = maybe_bias(up, self.up_bias)
    act = ACTIVATIONS[self.activation]
    if self.gate is None:
      hidden = act(up)
    else:
      hidden = act(contract('BTD,DF->BTF', x, self.gate, self.dtype)) * up
    hidden = sharding.constrain(hidden, ('batch', 'length', 'mlp'))
    out = contract('BTF,FD->BTD', hidden, self.down, self.dtype)
    return maybe_bias(out, self.down_bias)
