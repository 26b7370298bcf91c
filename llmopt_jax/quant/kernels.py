"""Kernels that multiply activations themselves: the quantized model's weights.

The model reads each weight matrix through `models.layers.contract` / `lookup`: a plain array
takes the usual `jnp.einsum` / `jnp.take`, anything else is asked to do it (`kernel.einsum`,
`kernel.take`). Putting one of these in place of a kernel in the parameter tree is therefore
all it takes to run a model quantized; the model classes do not change.

`QuantizedKernel` is the integer inference path: the weight is a `qwix.QArray` (int8 values,
or int4 values in JAX's int4 dtype; on disk they are packed two per byte, see storage.py) plus
float32 scales, and that is what the parameter tree holds. With weight-only quantization the
integers are converted and scaled inside the compiled forward pass, one fused elementwise
pass that feeds the float dot: on XLA:CPU this measured 3x faster at batch 1 than
`qwix.einsum`'s weight-only path (experiments/bench_quant.py's note in WORKSPACE.md). With
int8 activations both operands are integers and the dot accumulates in int32 (s8 x s8 ->
s32, `qwix.einsum`), the scales applied to the result.

`FakeQuantKernel` is its training-time twin for QAT with activation quantization: float
weights already on the grid, and activations rounded to int8 with a straight-through
gradient, so the forward pass computes what `QuantizedKernel` computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import struct

from llmopt_jax.quant import numerics

ACT_BITS = 8
ACT_MAX = 2 ** (ACT_BITS - 1) - 1


def _contracted(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.replace(' ', '').split('->')
  lhs, rhs = inputs.split(',')
  return lhs, rhs, ''.join(c for c in lhs if c in rhs and c not in out)


def activation_scale(spec: str, x: jax.Array, act_range: jax.Array | None) -> jax.Array:
  """int8 scale of the einsum's left operand: per token (the absmax over the contracted dims)
  when `act_range` is None (dynamic), else the calibrated tensor-wide range (static)."""
  lhs, _, contracted = _contracted(spec)
  if act_range is None:
    axes = tuple(i for i, c in enumerate(lhs) if c in contracted)
    top = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
  else:
    top = jnp.reshape(act_range, (1,) * x.ndim).astype(jnp.float32)
  return jnp.maximum(top, 1e-12) / ACT_MAX


def _static_range(kernel) -> jax.Array:
  if kernel.act_range is None:
    raise ValueError('activations=static, but this kernel has no calibrated range '
                     '(quant.calibration.activation_ranges)')
  return kernel.act_range


def quantize_activations(spec: str, x: jax.Array, act_range: jax.Array | None) -> qwix.QArray:
  scale = activation_scale(spec, x, act_range)
  q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -ACT_MAX - 1, ACT_MAX)
  return qwix.QArray(q.astype(jnp.int8), scale, None, jnp.int8)


def fake_quant_activations(spec: str, x: jax.Array, act_range: jax.Array | None) -> jax.Array:
  """x on the int8 grid and back; identity gradient inside the range, zero outside."""
  scale = jax.lax.stop_gradient(activation_scale(spec, x, act_range))
  q = numerics.clip_round_ste(x.astype(jnp.float32) / scale, -ACT_MAX - 1, ACT_MAX)
  return (q * scale).astype(x.dtype)


@struct.dataclass
class QuantizedKernel:
  """Integers plus scales in place of a float kernel (see the module docstring)."""
  weight: qwix.QArray
  act_range: jax.Array | None = None                 # static activations: calibrated |x| max
  activations: str = struct.field(pytree_node=False, default='none')

  @property
  def shape(self) -> tuple[int, ...]:
    return self.weight.qvalue.shape

  def dequantize(self) -> jax.Array:
    return qwix.dequantize(self.weight)

  def einsum(self, spec: str, x: jax.Array, dtype) -> jax.Array:
    if self.activations == 'none':
      y = jnp.einsum(spec, x.astype(dtype), self.dequantize().astype(dtype))
    else:
      act_range = _static_range(self) if self.activations == 'static' else None
      y = _integer_einsum(spec, quantize_activations(spec, x, act_range), self.weight)
    return y.astype(dtype)

  def take(self, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a quantized table, dequantized: only the gathered rows are converted."""
    w = self.weight
    q = jnp.take(w.qvalue, ids, axis=0).astype(jnp.float32)
    scale = _rows(w.scale, ids, q.shape[-1])
    if w.zero_point is not None:
      q = q - _rows(w.zero_point, ids, q.shape[-1]).astype(jnp.float32)
    return (q * scale).astype(dtype)


def _integer_einsum(spec: str, x: qwix.QArray, w: qwix.QArray) -> jax.Array:
  """int8 x int8 -> int32 einsum, then the scales, which are applied to the output: both are
  1 on the contracted dims (per-token activations; per-channel or per-tensor weights), so
  their einsum is their outer product on the output's shape. Per-group weights contract one
  group at a time (plain int8 dots, which XLA:CPU runs fast, unlike a dot with the group as
  a batch dim), each partial sum scaled by its group's scales, the groups summed in float.
  Weights with zero points go through `qwix.einsum` (correct, but slower on CPU)."""
  lhs, rhs, contracted = _contracted(spec)
  grouped = [c for c in contracted if w.scale.shape[rhs.index(c)] != 1]
  if w.zero_point is not None or len(grouped) > 1:
    return qwix.einsum(spec, x, w)
  wq = w.qvalue.astype(jnp.int8)
  if not grouped:
    return _scaled_dot(spec, x.qvalue, wq, x.scale, w.scale)
  (c,) = grouped
  x_axis, w_axis = lhs.index(c), rhs.index(c)
  groups = w.scale.shape[w_axis]
  size = wq.shape[w_axis] // groups
  take = lambda a, axis, i, n: jax.lax.slice_in_dim(a, i * n, (i + 1) * n, axis=axis)
  return sum(_scaled_dot(spec, take(x.qvalue, x_axis, i, size), take(wq, w_axis, i, size),
                         x.scale, take(w.scale, w_axis, i, 1)) for i in range(groups))


def _scaled_dot(spec: str, xq: jax.Array, wq: jax.Array, x_scale: jax.Array,
                w_scale: jax.Array) -> jax.Array:
  acc = jnp.einsum(spec, xq, wq, preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * jnp.einsum(spec, x_scale, w_scale)


def _rows(stat: jax.Array, ids: jax.Array, width: int) -> jax.Array:
  """Per-row (or shared) scale entries for rows `ids`, widened from groups to `width`."""
  rows = jnp.take(stat, ids, axis=0) if stat.shape[0] > 1 else stat[0][None]
  return jnp.repeat(rows.astype(jnp.float32), width // stat.shape[-1], axis=-1)


@struct.dataclass
class FakeQuantKernel:
  """QAT with activation quantization: grid weights, and int8-rounded activations."""
  weight: jax.Array                                  # already fake-quantized
  act_range: jax.Array | None = None
  activations: str = struct.field(pytree_node=False, default='dynamic')

  @property
  def shape(self) -> tuple[int, ...]:
    return self.weight.shape

  def einsum(self, spec: str, x: jax.Array, dtype) -> jax.Array:
    act_range = _static_range(self) if self.activations == 'static' else None
    x = fake_quant_activations(spec, x, act_range)
    return jnp.einsum(spec, x.astype(dtype), self.weight.astype(dtype))

  def take(self, ids: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.weight, ids, axis=0).astype(dtype)
