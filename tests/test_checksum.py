"""Checkpoint checksums: the same on any mesh, changed by any one-bit flip, and checked on
restore (the state a run resumes from, and the parameters a later stage loads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llmopt_jax import sharding
from llmopt_jax.train import checksum

DTYPES = ['float32', 'bfloat16', 'int32', 'int8', 'bool']


def _array(dtype: str) -> np.ndarray:
  values = np.random.default_rng(0).normal(size=(16, 24))
  return (values > 0) if dtype == 'bool' else (values * 50).astype(jnp.dtype(dtype))


@pytest.mark.parametrize('dtype', DTYPES)
def test_checksum_does_not_depend_on_the_sharding(dtype):
  """Integer sums wrap exactly, so no reduction order (no mesh) can change them."""
  x = _array(dtype)
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1})
  placed = [jnp.asarray(x), jax.device_put(x, NamedSharding(mesh, PartitionSpec('data', 'fsdp'))),
            jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, ('data', 'fsdp')))),
            jax.device_put(x, jax.devices()[3])]
  sums = {checksum.checksums({'x': a})['x'] for a in placed}
  assert len(sums) == 1, sums


@pytest.mark.parametrize('dtype', DTYPES)
def test_any_one_bit_flip_changes_the_checksum(dtype):
  """Every bit of a few elements, flipped alone: an odd weight times a power of two is never
  0 modulo 2^32, so each flip shows."""
  x = _array(dtype)
  reference = checksum.checksums({'x': x})['x']
  raw = x.view(np.uint8).reshape(-1)
  for byte in (0, 1, raw.size // 2, raw.size - 1):
    for bit in range(1 if dtype == 'bool' else 8):
      flipped = raw.copy()
      flipped[byte] ^= 1 << bit
      y = flipped.view(x.dtype).reshape(x.shape)
      assert checksum.checksums({'x': y})['x'] != reference, (byte, bit)


def test_moving_values_between_positions_changes_the_checksum():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  swapped = x.copy()
  swapped[0, 1], swapped[2, 3] = x[2, 3], x[0, 1]
  assert checksum.checksums({'x': x}) != checksum.checksums({'x': swapped})
  assert checksum.checksums({'x': x}) != checksum.checksums({'x': x.T.copy()})


def test_verify_names_the_array_that_differs():
  tree = {'params': {'a': np.ones(4, np.float32), 'b': np.zeros(3, np.float32)}}
  saved = checksum.checksums(tree)
  checksum.verify(tree, saved, 'step 3')  # unchanged: passes
  tree['params']['b'] = np.array([0, 0, 1e-30], np.float32)
  with pytest.raises(checksum.CorruptCheckpoint, match=r'step 3: 1 array.*params/b'):
    checksum.verify(tree, saved, 'step 3')
