"""Checksums of a checkpoint's arrays, so a damaged file is caught when it is read back.

Each array gets two 32-bit sums of its elements' bit patterns, each element weighted by an odd
multiplier of its position: integer sums wrap exactly, so the result does not depend on the
order XLA adds in, hence not on the mesh or the sharding the array is saved from or restored
onto. Flipping any bit of one element changes both sums (an odd weight times a power of two
is never 0 modulo 2^32); moving values between positions changes them too. The sums are
computed where the arrays live, by one jitted reduction, and only the scalars reach the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmopt_jax import optim

_MULTIPLIERS = (0x9E3779B1, 0x85EBCA6B)  # odd: golden-ratio and murmur3 constants


class CorruptCheckpoint(ValueError):
  """A restored array does not match the checksum saved with it."""


def checksums(tree: Any) -> dict[str, str]:
  """'path/to/array' -> 16 hex digits, for every array leaf of `tree`."""
  paths, leaves = _paths_and_leaves(tree)
  sums = jax.device_get(_sums(leaves))
  return {path: f'{int(a):08x}{int(b):08x}' for path, (a, b) in zip(paths, sums)}


def verify(tree: Any, expected: dict[str, str], what: str) -> None:
  """Raises `CorruptCheckpoint` naming the first array of `tree` whose checksum differs from
  `expected` (arrays `expected` does not list are not checked)."""
  actual = checksums(tree)
  bad = [path for path, value in actual.items() if path in expected and expected[path] != value]
  if bad:
    raise CorruptCheckpoint(f'{what}: {len(bad)} array(s) do not match the checksums saved '
                            f'with them (first: {bad[0]})')


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[jax.Array]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [optim.param_path(path) for path, _ in flat], [leaf for _, leaf in flat]


@jax.jit
def _sums(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_leaf_sums(x) for x in leaves]


def _leaf_sums(x: jax.Array) -> jax.Array:
  bits = _as_uint32(jnp.asarray(x))
  position = jnp.zeros(bits.shape, jnp.uint32)
  for dim, size in enumerate(bits.shape):  # the row-major index, without a reshape
    position = position * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim)
  return jnp.stack([jnp.sum(bits * (position * jnp.uint32(m) | jnp.uint32(1)), dtype=jnp.uint32)
                    for m in _MULTIPLIERS])


def _as_uint32(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(np.dtype(x.dtype).itemsize)
  if unsigned is None:
    raise TypeError(f'no checksum for {x.dtype} arrays')
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
