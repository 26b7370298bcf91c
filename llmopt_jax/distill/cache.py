"""Offline distillation: the teacher's top-k logits for every training example, on disk.

The teacher runs once over the training split (in order, deterministically) and its k largest
logits and their ids are written as `values.npy` (float32 [N, k]) and `indices.npy`
(int32 [N, k]) in `<workdir>/teacher_cache/`, with `meta.json` naming the teacher checkpoint
and k. Student training then reads them by example index (`WithTeacherCache`), with no
teacher in memory; `losses.topk_kd` renormalises the teacher over its top-k. With k equal to
the number of classes the loss is exactly the online one.

The cache is written to a temporary directory and renamed into place, so an interrupted run
never leaves a half-written cache that a restart would trust; a cache made by another teacher
or with another k is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from llmopt_jax.distill import losses

CACHE_DIR = 'teacher_cache'


def build(directory: str, meta: dict, batches: Iterable[dict[str, np.ndarray]],
          teacher_logits: Callable[[dict[str, np.ndarray]], jax.Array], k: int,
          num_examples: int) -> dict[str, np.ndarray]:
  """The cache in `directory` (made now unless one with the same `meta` exists).

  `batches` cover examples 0..num_examples-1 in order (padding rows, weight 0, at the end);
  `teacher_logits(batch)` returns fully replicated logits [b, C].
  """
  path = os.path.join(directory, CACHE_DIR)
  meta = {**meta, 'k': k, 'num_examples': num_examples}
  if _read_meta(path) == meta:
    return load(path)
  top = jax.jit(lambda logits: losses.topk(logits, k))
  values, indices = [], []
  for batch in batches:
    v, i = jax.device_get(top(teacher_logits(batch)))
    real = batch['weights'] > 0
    values.append(np.asarray(v)[real])
    indices.append(np.asarray(i)[real])
  arrays = {'values': np.concatenate(values)[:num_examples],
            'indices': np.concatenate(indices)[:num_examples]}
  if len(arrays['values']) != num_examples:
    raise RuntimeError(f'teacher cache: {len(arrays["values"])} rows for {num_examples} examples')
  if jax.process_index() == 0:
    _write(path, arrays, meta)
  multihost_utils.sync_global_devices('teacher cache written')
  return arrays


def load(path: str) -> dict[str, np.ndarray]:
  return {name: np.load(os.path.join(path, f'{name}.npy')) for name in ('values', 'indices')}


def _read_meta(path: str) -> dict | None:
  file = os.path.join(path, 'meta.json')
  if not os.path.exists(file):
    return None
  with open(file, encoding='utf-8') as f:
    return json.load(f)


def _write(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
  tmp = path + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name, array in arrays.items():
    np.save(os.path.join(tmp, f'{name}.npy'), array)
  with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=2)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)


class WithTeacherCache:
  """Training batches with the cached teacher rows of their examples added.

  Wraps an iterator whose batches carry `index` (the example ids of their rows), and keeps its
  position interface, so checkpoints resume it unchanged.
  """

  def __init__(self, batches, cache: dict[str, np.ndarray]):
    self._batches, self._cache = batches, cache

  def __iter__(self) -> WithTeacherCache:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._batches))
    rows = batch['index']
    batch['teacher_values'] = self._cache['values'][rows]
    batch['teacher_indices'] = self._cache['indices'][rows]
    return batch

  def get_state(self) -> dict:
    return self._batches.get_state()

  def set_state(self, state: dict) -> None:
    self._batches.set_state(state)
