"""Checksums of a checkpoint's arrays, so a damaged file is caught when it is read back.

An array's bytes (its global value, in row-major order) are read as 32-bit words arranged in
rows of its last dimension; its checksum is two sums modulo 2^32: the row sums weighted by an
odd multiplier of the row index, and the column sums weighted likewise by the column index.
Integer sums wrap exactly, so the value depends only on the array, not on the mesh or the
sharding it is saved from or restored onto. Flipping any one bit changes both sums (an odd
weight times a power of two is never 0 modulo 2^32); exchanging two different values changes
at least one of them. Truncated or deleted files are caught before this, by the reader.

The sums run in NumPy, one thread per core, at memory speed (`experiments/bench_checkpoint.py`
measures their share of a save). They need every array in one process: a multi-process run
saves no checksums (its restore then checks nothing).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import jax
import numpy as np

from llmopt_jax import optim

_ROW, _COLUMN = np.uint32(0x9E3779B1), np.uint32(0x85EBCA6B)  # odd: golden ratio, murmur3


class CorruptCheckpoint(ValueError):
  """A restored array does not match the checksum saved with it."""


def checksums(tree: Any) -> dict[str, str]:
  """'path/to/array' -> 16 hex digits, for every array leaf of `tree`."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  # NumPy's reductions release the GIL: one thread per core sums arrays side by side.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    sums = pool.map(lambda leaf: _checksum(np.asarray(leaf)), [leaf for _, leaf in flat])
    return {optim.param_path(path): value for (path, _), value in zip(flat, sums)}


def verify(tree: Any, expected: dict[str, str], what: str) -> None:
  """Raises `CorruptCheckpoint` naming the first array of `tree` whose checksum differs from
  `expected` (arrays `expected` does not list are not checked)."""
  actual = checksums(tree)
  bad = [path for path, value in actual.items() if path in expected and expected[path] != value]
  if bad:
    raise CorruptCheckpoint(f'{what}: {len(bad)} array(s) do not match the checksums saved '
                            f'with them (first: {bad[0]})')


def _checksum(x: np.ndarray) -> str:
  words = _words(x)
  with np.errstate(over='ignore'):
    rows = np.sum(words, axis=1, dtype=np.uint32)
    columns = np.sum(words, axis=0, dtype=np.uint32)
    by_row = np.sum(rows * _weights(len(rows), _ROW), dtype=np.uint32)
    by_column = np.sum(columns * _weights(len(columns), _COLUMN), dtype=np.uint32)
  return f'{int(by_row):08x}{int(by_column):08x}'


def _words(x: np.ndarray) -> np.ndarray:
  """The array's bytes as uint32 words, [rows, words per row] (zero-padded rows)."""
  x = np.ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)
  raw = x.view(np.uint8).reshape(x.shape[0], -1)
  pad = -raw.shape[1] % 4
  if pad:
    raw = np.pad(raw, ((0, 0), (0, pad)))
  return raw.view('<u4')


def _weights(n: int, multiplier: np.uint32) -> np.ndarray:
  with np.errstate(over='ignore'):
    return np.arange(n, dtype=np.uint32) * multiplier | np.uint32(1)
