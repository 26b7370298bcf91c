"""Pruned weights on disk: a kernel's non-zero values plus a bitmask, so the file shrinks.

A sparse kernel `w` is stored as two tensors of the one model.safetensors that
`quant/storage.py` writes (atomically, beside its JSON manifest):
  w.values   the non-zero entries in row-major order, in the kernel's dtype
  w.bitmask  one bit per entry (np.packbits order: the first entry in the high bit)
and the manifest's metadata lists {w: {"shape", "dtype"}} under "sparse". "Non-zero" is
bitwise: a -0.0 is a value, so loading gives back every bit. A kernel is stored this way
only where it is smaller (sparser than about 1/32 for float32); N:M kernels use the same
bitmask (one bit per weight, as 2-bit indices of 2 kept in 4 would be).

XLA on CPU multiplies dense matrices either way: the file shrinks, the model does not get
faster (the stage's report says so; structured pruning is what speeds it up).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx

from llmopt_jax import optim
from llmopt_jax.quant import storage as quant_storage

_VALUES, _BITMASK = '.values', '.bitmask'


def _nonzero(x: np.ndarray) -> np.ndarray:
  """Entries whose bits are not all zero (so -0.0 counts as a value)."""
  flat = np.ascontiguousarray(x).reshape(-1)
  return flat.view(np.dtype(f'u{flat.dtype.itemsize}')) != 0


def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(non-zero values, packed bitmask) of `x`."""
  nonzero = _nonzero(x)
  return np.ascontiguousarray(x).reshape(-1)[nonzero], np.packbits(nonzero)


def decode(values: np.ndarray, bitmask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of `encode`."""
  size = int(np.prod(shape))
  nonzero = np.unpackbits(bitmask, count=size).astype(bool)
  if int(nonzero.sum()) != values.size:
    raise ValueError(f'sparse tensor: the bitmask marks {int(nonzero.sum())} entries but '
                     f'{values.size} values are stored')
  out = np.zeros(size, values.dtype)
  out[nonzero] = values
  return out.reshape(shape)


def save(directory: str, params: nnx.State, sparse: Iterable[str],
         metadata: dict[str, Any]) -> int:
  """Writes `params`, the kernels named in `sparse` compressed where that is smaller;
  returns the bytes of the weights file."""
  sparse = set(sparse)
  tensors, manifest = {}, {}
  for parts, var in nnx.to_flat_state(params):
    name, value = optim.param_path(parts), np.asarray(jax.device_get(var.get_value()))
    values, bitmask = encode(value) if name in sparse else (None, None)
    if values is not None and values.nbytes + bitmask.nbytes < value.nbytes:
      tensors[name + _VALUES], tensors[name + _BITMASK] = values, bitmask
      manifest[name] = {'shape': list(value.shape), 'dtype': value.dtype.name}
    else:
      tensors[name] = value
  return quant_storage.save(directory, tensors, {**metadata, 'sparse': manifest})


def load(directory: str, like: nnx.State) -> tuple[nnx.State, dict[str, Any]]:
  """(params shaped like `like`, metadata) from `directory`, on the host."""
  tensors, metadata = quant_storage.load(directory)
  sparse = metadata.get('sparse', {})
  out = []
  for parts, var in nnx.to_flat_state(like):
    name = optim.param_path(parts)
    if name in sparse:
      value = decode(tensors[name + _VALUES], tensors[name + _BITMASK],
                     tuple(sparse[name]['shape']))
    elif name in tensors:
      value = tensors[name]
    else:
      raise ValueError(f'{directory}: the stored model has no tensor {name!r}')
    out.append((parts, var.replace(value)))
  return nnx.from_flat_state(out), metadata


def weight_bytes(directory: str) -> int:
  return quant_storage.weight_bytes(directory)
