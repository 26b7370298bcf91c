"""Integer grids for weights: where the scales live, how ranges are calibrated, rounding.

A kernel of shape [in..., out...] is quantized with one scale (and, asymmetric, one zero
point) per *block*; the block is what the granularity says:
  * per_tensor: the whole kernel;
  * per_channel: every input element of one output channel (the dims a matmul contracts), so
    each output feature keeps its own range;
  * per_group: runs of `group_size` along the last input dim within one output channel
    (GPTQ/AWQ-style groups). A group never spans two input dims: the attention output
    projection [heads, head_dim, embed] groups along head_dim, so a group is at most one
    head wide (min(group_size, head_dim)).
An embedding table [vocab, embed] is read a row at a time (and, tied, is the unembedding's
[vocab] output), so its "output channel" is the row.

Scales have the kernel's rank with 1 on reduced dims and in/group_size on the grouped dim:
the layout of a `qwix.QArray`, which is what the integer inference path holds.

Grid. b bits give integers in [-2^(b-1), 2^(b-1) - 1]. Symmetric: scale = range / (2^(b-1) - 1)
and no zero point. Asymmetric: scale = (max - min) / (2^b - 1) and an integer zero point z with
q = round(w / scale + z), w ~ (q - z) * scale (qwix's convention). Rounding is half-to-even
(jnp.round) everywhere, so fake quantization and the stored integers agree bit for bit.

Calibration picks the range of each block: absmax (no clipping), percentile (the p-th
percentile of |w|; asymmetric: of w at both ends), or mse (the clip ratio, on a grid from 1
down to 0.5 of absmax, that minimises the block's squared rounding-plus-clipping error).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from llmopt_jax.quant.config import QuantConfig

MSE_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # clip ratios 1.0, 0.975, ..., 0.5


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which dims of a kernel are reduced into one scale, and how the grouped dim is split."""
  shape: tuple[int, ...]
  reduce: tuple[int, ...]          # dims every scale covers whole
  group_axis: int | None = None    # per_group: the dim split into groups ...
  group: int = 0                   # ... of this many elements

  @property
  def scale_shape(self) -> tuple[int, ...]:
    return tuple(1 if a in self.reduce else (n // self.group if a == self.group_axis else n)
                 for a, n in enumerate(self.shape))

  @property
  def block_size(self) -> int:
    """Elements per scale (LSQ's gradient scale needs it)."""
    return math.prod(self.shape) // math.prod(self.scale_shape)


def layout(shape: tuple[int, ...], input_dims: int, cfg: QuantConfig, *, table: bool = False,
           name: str = 'kernel') -> Layout:
  """The blocks of a kernel whose leading `input_dims` dims are contracted (lora.input_dims);
  `table`: an embedding table, one block per row."""
  inputs = (1,) if table else tuple(range(input_dims))
  if cfg.granularity == 'per_tensor':
    return Layout(tuple(shape), tuple(range(len(shape))))
  if cfg.granularity == 'per_channel':
    return Layout(tuple(shape), inputs)
  axis = inputs[-1]
  group = min(cfg.group_size, shape[axis])
  if shape[axis] % group:
    raise ValueError(f'config.quant.group_size={cfg.group_size} does not divide dim {axis} '
                     f'(size {shape[axis]}) of {name} {tuple(shape)}')
  # Other input dims (the heads of attn/o) keep a scale each: no group spans two of them.
  return Layout(tuple(shape), (), axis, group)


def _blocked(x: jax.Array, lay: Layout) -> tuple[jax.Array, tuple[int, ...]]:
  """`x` with the grouped dim split into [groups, group], and the dims to reduce there."""
  if lay.group_axis is None:
    return x, lay.reduce
  a = lay.group_axis
  shape = x.shape[:a] + (x.shape[a] // lay.group, lay.group) + x.shape[a + 1:]
  reduce = tuple(d if d < a else d + 1 for d in lay.reduce) + (a + 1,)
  return x.reshape(shape), reduce


def _to_blocked(stat: jax.Array, lay: Layout) -> jax.Array:
  """A scale-shaped array reshaped to broadcast against the blocked kernel."""
  if lay.group_axis is None:
    return stat
  a = lay.group_axis
  return stat.reshape(stat.shape[:a + 1] + (1,) + stat.shape[a + 1:])


def bounds(bits: int) -> tuple[int, int]:
  return -2 ** (bits - 1), 2 ** (bits - 1) - 1


def _scale_zero(lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool):
  qmin, qmax = bounds(bits)
  tiny = jnp.finfo(jnp.float32).tiny ** 0.5
  if symmetric:
    scale = jnp.maximum(jnp.maximum(-lo, hi), tiny) / qmax
    return scale, None
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)  # zero must be exactly representable
  scale = jnp.maximum(hi - lo, tiny) / (qmax - qmin)
  return scale, jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)


def clip_round_ste(v: jax.Array, qmin: float, qmax: float) -> jax.Array:
  """round(v) clipped to [qmin, qmax] forward; backward, the straight-through estimator:
  gradient 1 where v rounds onto the grid (qmin - 1/2 <= v <= qmax + 1/2), 0 where it is
  clipped. The half step matters: absmax scaling puts each block's extreme exactly on qmax,
  where float rounding lands it a hair above or below, and it must not lose its gradient."""
  q = jnp.clip(jnp.round(v), qmin, qmax)
  inside = (v >= qmin - 0.5) & (v <= qmax + 0.5)
  return jnp.where(inside, v + jax.lax.stop_gradient(q - v), jax.lax.stop_gradient(q))


def _fake_blocked(xb, scale, zero, bits):
  qmin, qmax = bounds(bits)
  zero = 0.0 if zero is None else zero
  q = clip_round_ste(xb / scale + zero, qmin, qmax)
  return (q - zero) * scale


def fake_quant(w: jax.Array, scale: jax.Array, zero: jax.Array | None, lay: Layout,
               bits: int) -> jax.Array:
  """w rounded to the grid and back, in w's dtype; straight-through gradients for w, and the
  LSQ gradient for `scale` (it is differentiable: pass a stop_gradient one to fix it)."""
  wb, _ = _blocked(w.astype(jnp.float32), lay)
  z = None if zero is None else _to_blocked(zero, lay)
  return _fake_blocked(wb, _to_blocked(scale, lay), z, bits).reshape(w.shape).astype(w.dtype)


def integers(w: jax.Array, scale: jax.Array, zero: jax.Array | None, lay: Layout,
             bits: int) -> jax.Array:
  """The stored integers of `w` (int8 values, in the int4 range when bits == 4)."""
  qmin, qmax = bounds(bits)
  wb, _ = _blocked(w.astype(jnp.float32), lay)
  z = 0.0 if zero is None else _to_blocked(zero, lay)
  q = jnp.clip(jnp.round(wb / _to_blocked(scale, lay) + z), qmin, qmax)
  return q.reshape(w.shape).astype(jnp.int8)


def calibrate(w: jax.Array, lay: Layout, cfg: QuantConfig
              ) -> tuple[jax.Array, jax.Array | None]:
  """(scale, zero point or None), each of `lay.scale_shape`, float32, for weights `w`."""
  wb, reduce = _blocked(w.astype(jnp.float32), lay)
  reduced = lambda f: f(wb, axis=reduce, keepdims=True)
  if cfg.calibration == 'percentile':
    p = cfg.percentile
    if cfg.symmetric:
      hi = jnp.percentile(jnp.abs(wb), p, axis=reduce, keepdims=True)
      lo = -hi
    else:
      lo = jnp.percentile(wb, 100.0 - p, axis=reduce, keepdims=True)
      hi = jnp.percentile(wb, p, axis=reduce, keepdims=True)
  else:
    lo, hi = reduced(jnp.min), reduced(jnp.max)
    if cfg.calibration == 'mse':
      lo, hi = _mse_range(wb, reduce, lo, hi, cfg)
  scale, zero = _scale_zero(lo, hi, cfg.bits, cfg.symmetric)
  shape = lay.scale_shape
  return scale.reshape(shape), None if zero is None else zero.reshape(shape)


def _mse_range(wb, reduce, lo, hi, cfg: QuantConfig):
  """Per block, the shrunk range (ratio from MSE_GRID) with the least squared error."""
  def error(ratio):
    scale, zero = _scale_zero(lo * ratio, hi * ratio, cfg.bits, cfg.symmetric)
    return jnp.sum(jnp.square(_fake_blocked(wb, scale, zero, cfg.bits) - wb), axis=reduce,
                   keepdims=True)
  ratios = jnp.asarray(MSE_GRID, jnp.float32)
  errors = jax.lax.map(error, ratios)                  # [ratios, *block stats]
  best = ratios[jnp.argmin(errors, axis=0)]
  return lo * best, hi * best


def activation_range(x: jax.Array, cfg: QuantConfig) -> jax.Array:
  """One tensor-wide absolute range for int8 activations (static quantization): the
  calibration method of `cfg` applied to the whole tensor."""
  a = jnp.abs(x.astype(jnp.float32)).reshape(-1)
  if cfg.calibration == 'percentile':
    return jnp.percentile(a, cfg.percentile)
  top = jnp.max(a)
  if cfg.calibration == 'absmax':
    return top

  def error(ratio):
    scale = jnp.maximum(top * ratio, 1e-12) / 127.0
    q = jnp.clip(jnp.round(a / scale), -128, 127) * scale
    return jnp.sum(jnp.square(q - a))
  ratios = jnp.asarray(MSE_GRID, jnp.float32)
  return top * ratios[jnp.argmin(jax.lax.map(error, ratios))]
