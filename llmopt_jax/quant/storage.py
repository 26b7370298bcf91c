"""Quantized weights on disk: integers plus scales, so the file really shrinks.

A model directory holds two files:
  model.safetensors  every tensor. A plain array is stored as given (float32, bfloat16, int).
                     A `qwix.QArray` named `w` becomes `w.qvalue`, `w.scale` and, when it has
                     one, `w.zero_point`. int8 values are stored as int8. safetensors has no
                     4-bit dtype, so int4 values are packed two per uint8 byte, the first value
                     in the low nibble (`pack_int4`). Scales are stored in the dtype they were
                     computed in (float32 by qwix), not rounded further. An int4 zero point has
                     the scale's small shape, so it is widened to int8 rather than packed.
  quant.json         {"format": 1, "metadata": {...},
                      "quantized": {w: {"shape", "qtype", "packed", "zero_point_dtype"?}}},
                     which says how to rebuild each QArray.

Sizes quoted in reports are read from model.safetensors (`weight_bytes`), not computed from a
bits-per-weight formula, so the scales, zero points and header are counted too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import qwix

from llmopt_jax.hf import checkpoint

QUANT_JSON = 'quant.json'
FORMAT = 1
# Logical qtype name -> (numpy dtype held in QArray.qvalue, jnp type for QArray.qtype).
_QTYPES = {
    'int8': (np.dtype(np.int8), jnp.int8),
    'int4': (np.dtype(ml_dtypes.int4), jnp.int4),
}
_PARTS = ('qvalue', 'scale', 'zero_point')

Tensor = np.ndarray | jax.Array | qwix.QArray


def pack_int4(values: np.ndarray) -> np.ndarray:
  """Int values in [-8, 7] of any shape -> flat uint8, two per byte, first in the low nibble.

  An odd count is padded with one zero nibble, so the result has ceil(n / 2) bytes.
  """
  values = np.asarray(values)
  if values.dtype == ml_dtypes.int4:
    flat = values.reshape(-1).astype(np.int8)  # int4 cannot hold a value out of range
  elif np.issubdtype(values.dtype, np.integer):
    # Compare as Python ints: a uint64 or int64 value must not wrap before the check.
    if values.size and (int(values.min()) < -8 or int(values.max()) > 7):
      raise ValueError(f'pack_int4: values span [{int(values.min())}, {int(values.max())}], '
                       f'outside the int4 range [-8, 7]')
    flat = values.reshape(-1).astype(np.int8)
  else:
    raise ValueError(f'pack_int4: needs integer values in [-8, 7], got dtype {values.dtype}')
  if flat.size % 2:
    flat = np.concatenate([flat, np.zeros(1, np.int8)])
  nibbles = flat.view(np.uint8) & 0x0F  # two's complement low 4 bits
  return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of `pack_int4`: int8 values of `shape`, each nibble sign-extended."""
  packed = np.asarray(packed)
  n = int(np.prod(shape, dtype=np.int64))
  if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != (n + 1) // 2:
    raise ValueError(f'unpack_int4: expected {(n + 1) // 2} uint8 bytes for shape {shape}, '
                     f'got {packed.dtype} of shape {packed.shape}')
  nibbles = np.empty(2 * packed.size, np.int8)
  nibbles[0::2] = packed & 0x0F
  nibbles[1::2] = packed >> 4
  # A nibble b in [0, 15] is the int4 value b for b < 8 and b - 16 otherwise.
  signed = (nibbles ^ 8) - 8
  return signed[:n].reshape(shape)


def _tensors_of(name: str, array: Tensor) -> tuple[dict[str, np.ndarray], dict | None]:
  """One named entry -> the arrays stored for it, plus its quant.json record if quantized."""
  if not isinstance(array, qwix.QArray):
    return {name: np.asarray(array)}, None
  qtype = np.dtype(array.qtype).name
  if qtype not in _QTYPES:
    raise ValueError(f'{name}: qtype {qtype} cannot be stored; allowed: {sorted(_QTYPES)}')
  qvalue = np.asarray(array.qvalue)
  record = {'shape': list(qvalue.shape), 'qtype': qtype, 'packed': qtype == 'int4'}
  stored = {
      f'{name}.qvalue': pack_int4(qvalue) if record['packed'] else qvalue.astype(np.int8),
      f'{name}.scale': np.asarray(array.scale),
  }
  if array.zero_point is not None:
    zero_point = np.asarray(array.zero_point)
    record['zero_point_dtype'] = zero_point.dtype.name
    # safetensors cannot hold int4; the zero point is scale-sized, so widening costs little.
    stored[f'{name}.zero_point'] = (zero_point.astype(np.int8)
                                    if zero_point.dtype == ml_dtypes.int4 else zero_point)
  return stored, record


def _write(directory: str, tensors: dict[str, Tensor], metadata: dict) -> None:
  stored: list[tuple[str, np.ndarray]] = []
  quantized: dict[str, dict] = {}
  for name, array in tensors.items():
    arrays, record = _tensors_of(name, array)
    stored.extend(arrays.items())
    if record is not None:
      quantized[name] = record
  # One file, never sharded: weight_bytes and load read exactly model.safetensors.
  checkpoint.write(stored, directory, max_shard_bytes=1 << 62)
  with open(os.path.join(directory, QUANT_JSON), 'w') as f:
    json.dump({'metadata': metadata, 'quantized': quantized, 'format': FORMAT}, f, indent=2)


def save(directory: str, tensors: dict[str, Tensor], metadata: dict) -> int:
  """Writes tensors and metadata to `directory`; returns the bytes of its model.safetensors.

  Readers never see a half-written model: all files go to a temporary sibling directory,
  which then takes `directory`'s place. POSIX cannot rename onto a non-empty directory, so an
  existing one is first moved aside and deleted only once the new one is in place.
  """
  directory = os.path.abspath(directory)
  parent, base = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  temp = tempfile.mkdtemp(prefix=f'.{base}.tmp-', dir=parent)
  try:
    _write(temp, tensors, metadata)
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(directory):
    old = tempfile.mkdtemp(prefix=f'.{base}.old-', dir=parent)
    os.rename(directory, os.path.join(old, base))
  try:
    os.rename(temp, directory)
  except BaseException:
    if old is not None:
      os.rename(os.path.join(old, base), directory)
      shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(temp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return weight_bytes(directory)


def _existing(path: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file or directory (expected a model written by '
                            f'llmopt_jax.quant.storage.save)')
  return path


def load(directory: str) -> tuple[dict[str, np.ndarray | qwix.QArray], dict]:
  """Inverse of `save`: (name -> numpy array or QArray, metadata).

  Arrays stay on the host as numpy, so the caller places them on devices with its shardings.
  """
  _existing(directory)
  quant_path = _existing(os.path.join(directory, QUANT_JSON))
  weights_path = _existing(os.path.join(directory, checkpoint.SINGLE))
  with open(quant_path) as f:
    manifest = json.load(f)
  if manifest.get('format') != FORMAT:
    raise ValueError(f'{quant_path}: unknown format {manifest.get("format")!r}; '
                     f'this reader knows format {FORMAT}')
  quantized: dict[str, Any] = manifest['quantized']
  out: dict[str, np.ndarray | qwix.QArray] = {}
  with checkpoint.Reader(weights_path) as reader:
    parts = {f'{name}.{part}' for name in quantized for part in _PARTS}
    for name in reader.names():
      if name not in parts:
        out[name] = reader.get(name)
    for name, record in quantized.items():
      out[name] = _qarray(reader, name, record)
  return out, manifest['metadata']


def _qarray(reader: checkpoint.Reader, name: str, record: dict) -> qwix.QArray:
  dtype, qtype = _QTYPES[record['qtype']]
  shape = tuple(record['shape'])
  qvalue = reader.get(f'{name}.qvalue')
  if record['packed']:
    qvalue = unpack_int4(qvalue, shape)
  zero_point = None
  if 'zero_point_dtype' in record:
    # jnp.dtype, not np.dtype: it knows 'int4' as ml_dtypes' int4 rather than int32.
    zero_point = reader.get(f'{name}.zero_point').astype(jnp.dtype(record['zero_point_dtype']))
  return qwix.QArray(qvalue=qvalue.astype(dtype), scale=reader.get(f'{name}.scale'),
                     zero_point=zero_point, qtype=qtype)


def weight_bytes(directory: str) -> int:
  """Bytes of `<directory>/model.safetensors` on disk: the size reports quote."""
  return os.path.getsize(_existing(os.path.join(directory, checkpoint.SINGLE)))
