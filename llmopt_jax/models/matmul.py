"""The weight matmuls of every model, with a backward pass that XLA:CPU runs without copies.

A projection x [..., K] @ w [K, N] differentiated by JAX gets its weight gradient as a
dot_general of dy and x over the flattened leading axes, giving [N, K], followed by a transpose
to w's [K, N]. XLA:CPU moves that transpose onto the operands: it recomputes the backward
elementwise ops that produce dy a second time into a transposed [N, M] buffer and runs the
product through its generic dot, not through the YNNPACK fusion the other two products of the
layer get (experiments/results/profile_step_*.md: 7% of the GPT-2 step in such copies, the
weight-gradient products among the slowest). Here the backward pass is written out: the
weight gradient is x^T dy as one dot contracting the leading axis of both, already in w's
layout, and XLA runs it with no copy and no recomputation, in about half the time of the
autodiff version for a 4096 x 384 x 1536 layer (`experiments/bench_matmul.py`).

`einsum(spec, x, w)` takes the einsum spec of a projection, where w's axes are the
contracted axes of x followed by the output's new axes ('BTD,DNH->BTNH', 'BTF,FD->BTD',
'...I,IO->...O'), or the output's new axes followed by the contracted ones (a tied embedding
read as the LM head: 'BTD,VD->BTV'); any other spec is left to `jnp.einsum`. Values and
gradients are those of `jnp.einsum` up to float rounding.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class _Plan(NamedTuple):
  contracted: int      # trailing axes of x that w contracts
  w_transposed: bool   # w is [new..., contracted...] instead of [contracted..., new...]


@functools.cache
def _plan(spec: str) -> _Plan | None:
  """How `spec` maps onto a [M, K] x [K, N] matmul, or None when it does not."""
  inputs, out = spec.replace(' ', '').split('->')
  lhs, rhs = inputs.split(',')
  contracted = [a for a in rhs if a in lhs and a not in out]
  c = len(contracted)
  if not c or '.' in rhs or lhs[-c:] != ''.join(contracted):
    return None
  lead = lhs[:-c]
  if rhs[:c] == ''.join(contracted) and out == lead + rhs[c:]:
    return _Plan(c, False)
  if rhs[-c:] == ''.join(contracted) and out == lead + rhs[:-c]:
    return _Plan(c, True)
  return None


def einsum(spec: str, x: jax.Array, w: jax.Array,
           preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """`jnp.einsum(spec, x, w)` for a projection spec, with the backward pass above."""
  plan = _plan(spec)
  if plan is None:
    return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
  c = plan.contracted
  k = math.prod(x.shape[x.ndim - c:])
  if plan.w_transposed:
    new_axes = w.shape[:w.ndim - c]
    w2 = w.reshape(-1, k)
  else:
    new_axes = w.shape[c:]
    w2 = w.reshape(k, -1)
  lead = x.shape[:x.ndim - c]
  with jax.named_scope(spec):  # profiles name the product by its einsum, as jnp.einsum's
    y = _matmul(x.reshape(-1, k), w2, plan.w_transposed,
                None if preferred_element_type is None else jnp.dtype(preferred_element_type))
  return y.reshape(*lead, *new_axes)


def _dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int,
         preferred: jnp.dtype | None) -> jax.Array:
  """The 2-D product contracting axis `a_axis` of a with axis `b_axis` of b."""
  return lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())),
                         preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x: jax.Array, w: jax.Array, w_transposed: bool,
            preferred: jnp.dtype | None) -> jax.Array:
  """x [M, K] times w [K, N], or w [N, K] transposed: [M, N]."""
  return _dot(x, w, 1, 1 if w_transposed else 0, preferred)


def _matmul_forward(x, w, w_transposed, preferred):
  return _matmul(x, w, w_transposed, preferred), (x, w)


def _matmul_backward(w_transposed, preferred, residuals, dy):
  # As JAX's own transpose rule: products of the cotangent (float32 when the forward asked
  # for float32 from lower-precision operands) with the operands, cast to their dtypes.
  x, w = residuals
  dx = _dot(dy, w, 1, 0 if w_transposed else 1, preferred)  # [M, K]
  if w_transposed:
    dw = _dot(dy, x, 0, 0, preferred)                       # [N, K]
  else:
    dw = _dot(x, dy, 0, 0, preferred)                       # [K, N]
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_forward, _matmul_backward)
