"""Hugging Face safetensors checkpoints, read and written one tensor at a time.

HF layout: one `model.safetensors`, or shards `model-00001-of-00003.safetensors` listed by
`model.safetensors.index.json` ({"metadata": {"total_size": n}, "weight_map": {name: file}}).
Only safetensors is read: `.bin`, `.pt` and friends are Python pickles, which run arbitrary code
when loaded, so they are refused, not opened. Reading uses safetensors' numpy backend (never
torch); a file is memory-mapped and a tensor is copied out only when asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 tensors read as numpy)
import numpy as np
import safetensors
import safetensors.numpy

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')


def _refuse_pickle(path: str) -> None:
  raise ValueError(f'{path}: a pickled (PyTorch) checkpoint; llmopt_jax reads only safetensors, '
                   f'because unpickling can run arbitrary code. Convert it to '
                   f'{SINGLE} (save_pretrained(safe_serialization=True))')


def read_json(file: str) -> dict:
  """The JSON object in `file`; anything else is one line naming the file and the place."""
  with open(file, 'rb') as f:
    data = f.read()
  try:
    value = json.loads(data.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise ValueError(f'{file}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset '
                     f'{e.start})') from e
  except json.JSONDecodeError as e:
    raise ValueError(f'{file}: not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})') from e
  if not isinstance(value, dict):
    raise ValueError(f'{file}: a JSON object is needed, got {type(value).__name__}')
  return value


def _safe_open(file: str):
  """A safetensors handle on `file`; a truncated or foreign file fails naming it.

  The header (a length, then JSON giving every tensor's byte range) is checked against the
  file's size here, so a truncated download fails on opening rather than mid-load.
  """
  try:
    return safetensors.safe_open(file, framework='np')
  except safetensors.SafetensorError as e:
    reason = ' '.join(str(e).split())
    raise ValueError(f'{file}: not a readable safetensors file ({reason}); truncated, or not '
                     'a checkpoint?') from e


def checkpoint_files(path: str) -> dict[str, str]:
  """Tensor name -> file holding it, for a checkpoint directory or one .safetensors file."""
  if os.path.isfile(path):
    if path.endswith(PICKLE_SUFFIXES):
      _refuse_pickle(path)
    if not path.endswith('.safetensors'):
      raise ValueError(f'{path}: not a .safetensors file')
    with _safe_open(path) as f:
      return {name: path for name in f.keys()}
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file or directory')
  index = os.path.join(path, INDEX)
  if os.path.exists(index):
    weight_map = read_json(index).get('weight_map')
    if not isinstance(weight_map, dict) or not all(
        isinstance(file, str) for file in weight_map.values()):
      raise ValueError(f'{index}: no "weight_map" object of tensor name -> file name')
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  if os.path.exists(os.path.join(path, SINGLE)):
    return checkpoint_files(os.path.join(path, SINGLE))
  pickles = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES))
  if pickles:
    _refuse_pickle(os.path.join(path, pickles[0]))
  raise FileNotFoundError(f'{path}: holds neither {SINGLE} nor {INDEX}')


class Reader:
  """Named tensors of a checkpoint; files are opened on first use and closed by `close`."""

  def __init__(self, path: str):
    self.path = path
    self._files = checkpoint_files(path)
    self._open: dict[str, object] = {}

  def names(self) -> list[str]:
    return sorted(self._files)

  def _handle(self, name: str):
    file = self._files[name]
    if file not in self._open:
      if not os.path.exists(file):
        raise FileNotFoundError(f'{file}: listed in {INDEX} for tensor {name} but missing')
      self._open[file] = _safe_open(file)
    return self._open[file]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    return self._handle(name).get_tensor(name)

  def close(self) -> None:
    self._open.clear()  # safe_open handles unmap their file when released

  def __enter__(self) -> Reader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str, *,
          max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes (name, array) pairs as HF safetensors, sharded with an index past
  `max_shard_bytes`; only one shard is held in memory at a time. Returns the file names."""
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, str]] = []  # per shard: tensor name -> temporary file

  def flush(batch: dict[str, np.ndarray]) -> None:
    temp = os.path.join(out_dir, f'.shard-{len(shards):05d}.tmp')
    # HF's loader checks metadata["format"]; "pt" is what save_pretrained writes.
    safetensors.numpy.save_file(batch, temp, metadata={'format': 'pt'})
    shards.append({name: temp for name in batch})

  batch: dict[str, np.ndarray] = {}
  size = total = 0
  for name, array in _checked(tensors):
    if batch and size + array.nbytes > max_shard_bytes:
      flush(batch)
      batch, size = {}, 0
    batch[name] = np.ascontiguousarray(array)
    size += array.nbytes
    total += array.nbytes
  flush(batch)
  if len(shards) == 1:
    os.replace(next(iter(shards[0].values())), os.path.join(out_dir, SINGLE))
    return [SINGLE]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    os.replace(next(iter(shard.values())), os.path.join(out_dir, file))
    weight_map.update({name: file for name in shard})
    files.append(file)
  with open(os.path.join(out_dir, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return files + [INDEX]


def _checked(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
  seen = set()
  for name, array in tensors:
    if name in seen:
      raise ValueError(f'tensor {name} written twice')
    seen.add(name)
    yield name, array
