"""models/matmul.py: the projections' matmul equals jnp.einsum in value and gradient, and its
weight gradient compiles without the transposed copies autodiff of the einsum gets."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from llmopt_jax.models import matmul

# Every projection spec the models use, with shapes for x and w.
SPECS = {
    'BTD,DF->BTF': ((2, 5, 8), (8, 12)),
    'BTD,DNH->BTNH': ((2, 5, 8), (8, 3, 4)),
    'BTNH,NHD->BTD': ((2, 5, 3, 4), (3, 4, 8)),
    '...I,IO->...O': ((2, 8), (8, 6)),
    'BTD,VD->BTV': ((2, 5, 8), (16, 8)),
    'BTD,DV->BTV': ((2, 5, 8), (8, 16)),
}


def _operands(spec, dtype=jnp.float32):
  x_shape, w_shape = SPECS[spec]
  kx, kw = jax.random.split(jax.random.key(0))
  return (jax.random.normal(kx, x_shape).astype(dtype),
          jax.random.normal(kw, w_shape).astype(dtype))


@pytest.mark.parametrize('spec', list(SPECS))
def test_value_and_gradients_are_the_einsums(spec):
  x, w = _operands(spec)
  y = matmul.einsum(spec, x, w)
  want = jnp.einsum(spec, x, w)
  assert y.shape == want.shape
  # Each output sums at most K = x's last axes' size of products of N(0,1)s; gradients of
  # sum(y * r) sum at most M or N terms. 64 bounds every such count here.
  terms = 64
  tol = tolerances.sum_tolerance(terms, float(jnp.max(jnp.abs(want))) + 1.0)
  np.testing.assert_allclose(y, want, atol=tol, rtol=0)
  r = jax.random.normal(jax.random.key(1), want.shape)
  ours = jax.grad(lambda a, b: jnp.sum(matmul.einsum(spec, a, b) * r), argnums=(0, 1))(x, w)
  theirs = jax.grad(lambda a, b: jnp.sum(jnp.einsum(spec, a, b) * r), argnums=(0, 1))(x, w)
  for got, expected in zip(ours, theirs):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tol = tolerances.sum_tolerance(terms, float(jnp.max(jnp.abs(expected))) * 8 + 1.0)
    np.testing.assert_allclose(got, expected, atol=tol, rtol=0)


def test_bfloat16_operands_with_float32_result_keep_autodiffs_dtypes():
  spec = 'BTD,VD->BTV'  # the tied LM head: bfloat16 compute, float32 logits
  x, w = _operands(spec, jnp.bfloat16)
  y = matmul.einsum(spec, x, w, preferred_element_type=jnp.float32)
  assert y.dtype == jnp.float32
  grads = jax.grad(lambda a, b: jnp.sum(matmul.einsum(
      spec, a, b, preferred_element_type=jnp.float32) ** 2), argnums=(0, 1))(x, w)
  want = jax.grad(lambda a, b: jnp.sum(jnp.einsum(
      spec, a, b, preferred_element_type=jnp.float32) ** 2), argnums=(0, 1))(x, w)
  for got, expected in zip(grads, want):
    assert got.dtype == jnp.bfloat16
    # Both accumulate in float32 and round once to bfloat16: within one bfloat16 ulp.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               rtol=2 ** -7, atol=1e-2)


def test_other_specs_fall_back_to_einsum():
  q = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  k = jax.random.normal(jax.random.key(1), (2, 7, 3, 4))
  spec = 'BTNH,BSNH->BNTS'  # attention scores: batched, not a projection
  np.testing.assert_array_equal(matmul.einsum(spec, q, k), jnp.einsum(spec, q, k))


def _moved(fn, *args) -> list[str]:
  """The instructions of the compiled program's entry computation that copy or transpose
  (by op, or by the name XLA gives a fusion built around one)."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  entry = text[text.index('ENTRY'):]
  return [f'{name} = {op}' for name, op in re.findall(r'%(\S+) = \S+ ([\w-]+)\(', entry)
          if any(word in name or word in op for word in ('copy', 'transpose'))]


def test_weight_gradient_compiles_without_transposes():
  """The property the module exists for, on a GELU MLP layer's shapes: autodiff of the einsum
  transposes the layer's output gradient; the written-out backward pass does not."""
  x = jax.ShapeDtypeStruct((4, 64, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((32, 128), jnp.float32)

  def loss(project):
    return lambda a, b: jnp.sum(jax.nn.gelu(project('BTD,DF->BTF', a, b)))

  assert _moved(jax.grad(loss(jnp.einsum), argnums=(0, 1)), x, w)
  assert not _moved(jax.grad(loss(matmul.einsum), argnums=(0, 1)), x, w)
