"""models/dropout.py: the statistics of the 16-bit-per-decision mask, and its invariances."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llmopt_jax.models import dropout

# Odd last axis: the last word's second half is cut off, and pairs straddle nothing.
SHAPE = (64, 8, 1023)
N = math.prod(SHAPE)
SIGMAS = 5.0  # a deviation beyond 5 standard errors has odds ~3e-7 under a correct mask


def _mask(rate: float, seed: int = 0) -> np.ndarray:
  return np.asarray(dropout.keep_mask(jax.random.key(seed), SHAPE, rate))


@pytest.mark.parametrize('rate', [0.1, 0.5, 0.9])
def test_keep_fraction_is_the_threshold_over_two_to_the_sixteen(rate):
  p = dropout.keep_probability(rate)
  assert abs(p - (1 - rate)) <= 2 ** -17
  kept = _mask(rate).mean()
  assert abs(kept - p) <= SIGMAS * math.sqrt(p * (1 - p) / N)


def test_the_two_halves_of_a_word_are_independent():
  """Elements 2j and 2j + 1 share a word: both kept with probability p^2, not more."""
  rate = 0.5
  p = dropout.keep_probability(rate)
  mask = _mask(rate)[..., :1022].reshape(-1, 2)
  both = (mask[:, 0] & mask[:, 1]).mean()
  assert abs(both - p * p) <= SIGMAS * math.sqrt(p * p * (1 - p * p) / len(mask))


def test_same_key_same_mask_another_key_independent():
  a, b = _mask(0.5, seed=0), _mask(0.5, seed=1)
  np.testing.assert_array_equal(a, _mask(0.5, seed=0))
  assert (a != b).mean() == pytest.approx(0.5, abs=SIGMAS * math.sqrt(0.25 / N))


def test_layer_is_unbiased_and_scales_the_kept():
  rate = 0.1
  layer = dropout.Dropout(rate)
  x = jnp.full(SHAPE, 3.0, jnp.float32)
  y = np.asarray(layer(x, deterministic=False, rngs=nnx.Rngs(dropout=0)))
  p = dropout.keep_probability(rate)
  assert set(np.unique(y)) <= {0.0, np.float32(3.0 / p)}
  # mean(y) / 3 = kept fraction / p: mean 1, standard error sqrt((1 - p) / (p N)).
  assert abs(y.mean() / 3.0 - 1.0) <= SIGMAS * math.sqrt((1 - p) / (p * N))


def test_identity_when_deterministic_or_rate_zero_and_zeros_at_rate_one():
  x = jnp.arange(12.0).reshape(3, 4)
  rngs = nnx.Rngs(dropout=0)
  np.testing.assert_array_equal(dropout.Dropout(0.3)(x, deterministic=True), x)
  np.testing.assert_array_equal(dropout.Dropout(0.0)(x, deterministic=False, rngs=rngs), x)
  np.testing.assert_array_equal(dropout.Dropout(1.0)(x, deterministic=False, rngs=rngs), 0)


def test_gradient_is_the_mask_over_the_keep_probability():
  layer, rate = dropout.Dropout(0.25), 0.25
  x = jnp.ones((4, 33))
  key = jax.random.key(7)
  grad = jax.grad(lambda v: layer(v, deterministic=False, rngs=nnx.Rngs(dropout=key)).sum())(x)
  p = dropout.keep_probability(rate)
  assert set(np.unique(np.asarray(grad))) <= {0.0, np.float32(1 / p)}


@pytest.mark.parametrize('spec', [P('data', None, None), P(None, None, 'data'),
                                  P(None, 'data', None)])
def test_mask_is_the_same_however_the_array_is_sharded(spec):
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  shape = (16, 8, 1024)
  key = jax.random.key(3)
  x = jax.device_put(jnp.ones(shape), NamedSharding(mesh, spec))
  layer = dropout.Dropout(0.1)

  @jax.jit
  def apply(v, k):
    return layer(v, deterministic=False, rngs=nnx.Rngs(dropout=k))

  sharded = apply(x, key)
  assert sharded.sharding.spec == spec  # the bits were drawn shard by shard
  p = dropout.keep_probability(0.1)
  np.testing.assert_array_equal(np.asarray(sharded) != 0, _stream_mask(key, shape, 0.1))
  assert abs((np.asarray(sharded) != 0).mean() - p) < 0.01


def _stream_mask(key, shape, rate):
  """The mask the layer draws with `nnx.Rngs(dropout=key)`, computed on one device."""
  layer = dropout.Dropout(rate)
  return np.asarray(jax.jit(lambda k: layer(jnp.ones(shape), deterministic=False,
                                            rngs=nnx.Rngs(dropout=k)))(key)) != 0


def test_bad_rate_is_refused():
  with pytest.raises(ValueError, match='dropout rate'):
    dropout.Dropout(1.5)


def test_bfloat16_inputs_keep_their_dtype():
  x = jnp.full((8, 64), 1.0, jnp.bfloat16)
  y = dropout.Dropout(0.1)(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert y.dtype == jnp.bfloat16
  p = dropout.keep_probability(0.1)
  assert set(np.unique(np.asarray(y, np.float32))) <= {0.0, float(jnp.bfloat16(1 / p))}
