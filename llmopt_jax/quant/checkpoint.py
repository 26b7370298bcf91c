"""A quantized model's parameter tree to and from a storage directory (storage.py).

Every parameter is stored under its path ('backbone/blocks/0/attn/q'): quantized kernels as
their integers and scales, with the static activation range (if any) beside them as
'<path>.act_range'; everything else as the float array it is. The recipe is kept in the
directory's metadata, so `load` rebuilds the same `QuantizedKernel`s without being told how.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from llmopt_jax import optim
from llmopt_jax.quant import kernels, storage
from llmopt_jax.quant.config import QuantConfig

_ACT = '.act_range'


def save(directory: str, params: nnx.State, cfg: QuantConfig | None,
         extra: dict | None = None) -> int:
  """Writes `params` (plain or holding QuantizedKernels) to `directory`; returns the bytes of
  its weights file as written."""
  tensors = {}
  for parts, var in nnx.to_flat_state(params):
    path, value = optim.param_path(parts), var.get_value()
    if isinstance(value, kernels.QuantizedKernel):
      tensors[path] = value.weight
      if value.act_range is not None:
        tensors[path + _ACT] = np.asarray(value.act_range, np.float32).reshape(1)
    else:
      tensors[path] = value
  tensors = jax.device_get(tensors)
  metadata = {'recipe': None if cfg is None else dataclasses.asdict(cfg), **(extra or {})}
  return storage.save(directory, tensors, metadata)


def load(directory: str, like: nnx.State) -> tuple[nnx.State, QuantConfig | None, dict]:
  """(params shaped like the float tree `like`, the recipe, the metadata) from `directory`.

  Arrays come back on the host (numpy); place them where they are needed.
  """
  tensors, metadata = storage.load(directory)
  recipe = metadata.get('recipe')
  cfg = None if recipe is None else QuantConfig(**recipe)
  out = []
  for parts, var in nnx.to_flat_state(like):
    path = optim.param_path(parts)
    if path not in tensors:
      raise ValueError(f'{directory}: the stored model has no tensor {path!r}')
    value = tensors[path]
    if not isinstance(value, np.ndarray):  # a QArray
      act = tensors.get(path + _ACT)
      value = kernels.QuantizedKernel(value, None if act is None else act.reshape(()),
                                      cfg.activations if cfg else 'none')
    out.append((parts, var.replace(value)))
  return nnx.from_flat_state(out), cfg, metadata
